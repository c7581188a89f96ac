/* memory.c — what a full fine-tune of a config needs, from the arenas jetmoe
 * allocates: fp32 weights and gradients, AdamW's two moments, and the
 * activations of one micro-batch (jm_activation_bytes: the plan jm_forward_batch
 * carves). With ZeRO-1 over N hosts (issue 13) each host keeps all weights and
 * gradients but 1/N of the optimizer state.
 *
 *     memory [config.json] [T]     (default: JetMoE-8B, T = 2048) */
#include "jetmoe.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    jm_config c;
    jm_error err;
    jm_config_default(&c);
    if (argc > 1 && jm_config_load(argv[1], &c, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    int T = argc > 2 ? atoi(argv[2]) : 2048;
    if (T > c.max_position_embeddings) T = c.max_position_embeddings;
    const double P = (double)jm_config_num_params(&c), GB = 1e9;
    const double w = 4 * P, g = 4 * P, opt = 8 * P, act = (double)jm_activation_bytes(&c, 1, T);
    printf("config: %s, %.3fB parameters (%.3fB active per token)\n", argc > 1 ? argv[1] : "JetMoE-8B",
           P / 1e9, jm_config_active_params(&c) / 1e9);
    printf("weights (fp32)        %8.1f GB\n", w / GB);
    printf("gradients (fp32)      %8.1f GB\n", g / GB);
    printf("AdamW m and v (fp32)  %8.1f GB\n", opt / GB);
    printf("activations, 1 x %-5d %8.1f GB per packed row of the micro-batch\n", T, act / GB);
    printf("\nper host, batch_size 1 row of %d tokens:\n", T);
    for (int n = 1; n <= 16; n *= 2)
        printf("  %2d host%s (ZeRO-1: optimizer state / %d)  %8.1f GB\n", n, n > 1 ? "s" : " ", n,
               (w + g + opt / n + act) / GB);
    return 0;
}
