/* test_comm_nompi — the process grid of a build without MPI (make MPI=0):
 * one process runs as before; launched as one of several ranks (the
 * launcher's environment says so) it refuses with the reason, instead of N
 * copies writing one run directory. comm.c is compiled here without JM_MPI,
 * whatever this build has. */
#undef JM_MPI
#include "train/comm.c"

#include <stdio.h>

static int failures;
static void check(int ok, const char *what, const char *detail)
{
    printf("%s comm_nompi_%s%s%s\n", ok ? "PASS" : "FAIL", what, detail[0] ? ": " : "", detail);
    failures += !ok;
}

int main(void)
{
    jm_error err = {{0}};
    jm_comm *c = NULL;
    unsetenv("OMPI_COMM_WORLD_SIZE"), unsetenv("PMI_SIZE"), unsetenv("SLURM_STEP_NUM_TASKS");
    jm_status s = jm_comm_open(1, 0, &c, &err);
    check(!s && c && jm_comm_size(c) == 1 && jm_comm_rank(c) == 0 && jm_comm_dp(c) == 1 && jm_comm_pp(c) == 1,
          "single_process", s ? err.msg : "1 rank, 1 x 1 grid");
    double x[2] = {1.5, 2.5};
    if (c) {
        s = jm_comm_allreduce_sum(c, JM_GROUP_WORLD, x, 2, "test", &err);
        check(!s && x[0] == 1.5 && x[1] == 2.5, "allreduce_is_identity", "");
        jm_comm_close(c, 0);
    }
    s = jm_comm_open(2, 0, &c, &err);
    check(s == JM_ERR_ARG && strstr(err.msg, "does not divide"), "pp_must_divide", err.msg);
    static const char *const vars[][2] = {{"OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"},
                                          {"PMI_SIZE", "PMI_RANK"},
                                          {"SLURM_STEP_NUM_TASKS", "SLURM_PROCID"}};
    for (int i = 0; i < 3; i++) {
        setenv(vars[i][0], "4", 1);
        setenv(vars[i][1], "2", 1);
        c = NULL;
        s = jm_comm_open(1, 0, &c, &err);
        char what[64];
        snprintf(what, sizeof what, "refuses_as_rank_%s", vars[i][0]);
        check(s == JM_ERR_ARG && !c && strstr(err.msg, "rank 2 of 4") && strstr(err.msg, "without MPI"), what,
              err.msg);
        unsetenv(vars[i][0]);
        unsetenv(vars[i][1]);
    }
    setenv("OMPI_COMM_WORLD_SIZE", "1", 1); /* mpirun -np 1: one process, as before */
    c = NULL;
    s = jm_comm_open(1, 0, &c, &err);
    check(!s && c && jm_comm_size(c) == 1, "np1_runs", s ? err.msg : "");
    jm_comm_close(c, 0);
    return failures ? 1 : 0;
}
