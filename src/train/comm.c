/* comm.c — the process grid and its messages (comm.h), over MPI.
 *
 * Open MPI does the transport (shared memory on a host, TCP or InfiniBand
 * between hosts); this file only arranges ranks and puts a deadline on every
 * wait. Waits poll (MPI_Testall) with a growing sleep instead of blocking in
 * MPI: a blocked MPI call spins on its core, which on an oversubscribed or
 * shared host takes the core from the rank it waits for, and it could not
 * give up at a deadline. Counts above 2^31 floats (an 8B model's arena) travel
 * as 16-float blocks: shards and pieces are multiples of 16 floats. */
#include "train/comm.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef JM_MPI
#include <mpi.h>
#endif

#define DEFAULT_TIMEOUT 600.0 /* seconds; a checkpoint of JetMoE-8B is written while the others wait */
#define MAX_PENDING 4096

struct jm_comm {
    int rank, size, pp, dp, stage, replica, local_size;
    double timeout;
    int64_t bytes_sent;
    double waited;
#ifdef JM_MPI
    int mpi;    /* this process called MPI_Init */
    int joined;  /* world and block exist */
    int has_dpc; /* and dpc */
    MPI_Comm world, dpc;
    MPI_Datatype block; /* 16 floats */
    MPI_Request pending[MAX_PENDING];
    int npending;
#endif
};

int jm_comm_rank(const jm_comm *c) { return c->rank; }
int jm_comm_size(const jm_comm *c) { return c->size; }
int jm_comm_pp(const jm_comm *c) { return c->pp; }
int jm_comm_dp(const jm_comm *c) { return c->dp; }
int jm_comm_stage(const jm_comm *c) { return c->stage; }
int jm_comm_replica(const jm_comm *c) { return c->replica; }
int jm_comm_local_size(const jm_comm *c) { return c->local_size; }
int64_t jm_comm_bytes_sent(const jm_comm *c) { return c->bytes_sent; }
double jm_comm_wait_seconds(const jm_comm *c) { return c->waited; }

/* The launcher's word on how many ranks this job has: Open MPI's mpirun,
 * PMI (MPICH, Slurm's srun --mpi=pmi2) or srun itself; 0 when not launched. */
static int launched_size(int *rank)
{
    static const char *const size_vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"};
    static const char *const rank_vars[] = {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"};
    for (int i = 0; i < 3; i++) {
        const char *v = getenv(size_vars[i]);
        if (v && atoi(v) > 0) {
            const char *r = getenv(rank_vars[i]);
            *rank = r ? atoi(r) : 0;
            return atoi(v);
        }
    }
    *rank = 0;
    return 0;
}

int jm_launch_rank(void)
{
    int rank;
    launched_size(&rank);
    return rank;
}

static jm_status check_grid(int size, int pp, jm_error *err)
{
    if (pp < 1) return jm_fail(err, JM_ERR_ARG, "--pp %d: need at least one pipeline stage", pp);
    if (size % pp != 0)
        return jm_fail(err, JM_ERR_ARG, "--pp %d does not divide the %d ranks: the run is --pp stages x N/--pp "
                       "data-parallel replicas", pp, size);
    return JM_OK;
}

jm_status jm_comm_open(int pp, double timeout, jm_comm **out, jm_error *err)
{
    *out = NULL;
    int env_rank, env_size = launched_size(&env_rank);
    jm_comm *c = calloc(1, sizeof *c);
    if (!c) return jm_fail(err, JM_ERR_NOMEM, "out of memory");
    c->size = 1, c->pp = 1, c->dp = 1, c->local_size = 1;
    c->timeout = timeout > 0 ? timeout : DEFAULT_TIMEOUT;
#ifdef JM_MPI
    if (env_size > 0) {
        int inited = 0, provided;
        MPI_Initialized(&inited);
        if (!inited && MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
            free(c);
            return jm_fail(err, JM_ERR_IO, "MPI_Init failed (launched as rank %d of %d)", env_rank, env_size);
        }
        c->mpi = !inited;
        MPI_Comm_dup(MPI_COMM_WORLD, &c->world);
        /* errors come back as codes, to be reported with what was being done */
        MPI_Comm_set_errhandler(c->world, MPI_ERRORS_RETURN);
        MPI_Comm_rank(c->world, &c->rank);
        MPI_Comm_size(c->world, &c->size);
        MPI_Comm local;
        MPI_Comm_split_type(c->world, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &local);
        MPI_Comm_size(local, &c->local_size);
        MPI_Comm_free(&local);
        MPI_Type_contiguous(16, MPI_FLOAT, &c->block);
        MPI_Type_commit(&c->block);
        c->joined = 1;
    }
#else
    if (env_size > 1) {
        free(c);
        return jm_fail(err, JM_ERR_ARG, "launched as rank %d of %d, but this jetmoe was built without MPI (make "
                       "MPI=0): the copies would all write one run directory. Rebuild with MPI (libopenmpi-dev) "
                       "or run one process", env_rank, env_size);
    }
#endif
    jm_status s = check_grid(c->size, pp, err);
    if (s) {
        jm_comm_close(c, 0);
        return s;
    }
    c->pp = pp;
    c->dp = c->size / pp;
    c->stage = c->rank % pp;
    c->replica = c->rank / pp;
#ifdef JM_MPI
    if (c->size > 1) {
        MPI_Comm_split(c->world, c->stage, c->rank, &c->dpc);
        MPI_Comm_set_errhandler(c->dpc, MPI_ERRORS_RETURN);
        c->has_dpc = 1;
    }
#endif
    *out = c;
    return JM_OK;
}

void jm_comm_close(jm_comm *c, int failed)
{
    if (!c) return;
#ifdef JM_MPI
    if (c->size > 1 && failed) {
        /* the others may be waiting for this rank: stop the whole job now
         * rather than at their deadline (the error was printed by the caller) */
        fflush(stderr);
        MPI_Abort(c->world, 1);
    }
    if (c->has_dpc) MPI_Comm_free(&c->dpc);
    if (c->joined) {
        MPI_Type_free(&c->block);
        MPI_Comm_free(&c->world);
    }
    if (c->mpi) MPI_Finalize();
#else
    (void)failed;
#endif
    free(c);
}

#ifdef JM_MPI
static MPI_Comm group_comm(const jm_comm *c, jm_group g) { return g == JM_GROUP_DP ? c->dpc : c->world; }

static int group_size(const jm_comm *c, jm_group g) { return g == JM_GROUP_DP ? c->dp : c->size; }

static jm_status mpi_failed(const jm_comm *c, int rc, const char *what, jm_error *err)
{
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    (void)c;
    return jm_fail(err, JM_ERR_IO, "%s: %s", what, msg);
}

/* rc: the MPI call's result; *req: the request it made (read here, after the call) */
static jm_status push(jm_comm *c, int rc, const MPI_Request *req, const char *what, jm_error *err)
{
    if (rc != MPI_SUCCESS) return mpi_failed(c, rc, what, err);
    if (c->npending == MAX_PENDING) {
        jm_status s = jm_comm_wait(c, what, err);
        if (s) return s;
    }
    c->pending[c->npending++] = *req;
    return JM_OK;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
#endif

void jm_comm_poll(jm_comm *c)
{
#ifdef JM_MPI
    if (c->npending) {
        int done;
        MPI_Testall(c->npending, c->pending, &done, MPI_STATUSES_IGNORE);
        if (done) c->npending = 0;
    }
#else
    (void)c;
#endif
}

jm_status jm_comm_wait(jm_comm *c, const char *what, jm_error *err)
{
#ifdef JM_MPI
    if (!c->npending) return JM_OK;
    const double start = now_s();
    long sleep_ns = 1000;
    for (;;) {
        int done = 0;
        int rc = MPI_Testall(c->npending, c->pending, &done, MPI_STATUSES_IGNORE);
        double waited = now_s() - start;
        if (rc != MPI_SUCCESS) return mpi_failed(c, rc, what, err);
        if (done) {
            c->npending = 0;
            c->waited += waited;
            return JM_OK;
        }
        if (waited > c->timeout)
            return jm_fail(err, JM_ERR_IO, "no answer from the other ranks for %.0f s while %s: one of them died "
                           "or hangs (the deadline is --timeout %.0f s); stopping the job", waited, what, c->timeout);
        /* poll fast at first (most waits are short), then sleep up to 1 ms */
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < 1000000) sleep_ns *= 2;
    }
#else
    (void)c, (void)what, (void)err;
    return JM_OK;
#endif
}

jm_status jm_comm_reduce_scatter_start(jm_comm *c, jm_group g, const float *send, float *recv, const int *counts,
                                       jm_error *err)
{
#ifdef JM_MPI
    if (group_size(c, g) > 1) {
        MPI_Request req;
        int rc = MPI_Ireduce_scatter(send, recv, counts, MPI_FLOAT, MPI_SUM, group_comm(c, g), &req);
        int64_t n = 0;
        for (int i = 0; i < group_size(c, g); i++) n += counts[i];
        c->bytes_sent += 4 * n; /* about what a ring or a tree sends per rank */
        return push(c, rc, &req, "reducing gradients", err);
    }
#endif
    (void)c, (void)g, (void)err;
    if (recv != send) memcpy(recv, send, sizeof(float) * (size_t)counts[0]);
    return JM_OK;
}

jm_status jm_comm_send_start(jm_comm *c, int to, int tag, const float *buf, int64_t n, jm_error *err)
{
#ifdef JM_MPI
    MPI_Request req;
    if (n > INT32_MAX) return jm_fail(err, JM_ERR_ARG, "message of %lld floats is too large", (long long)n);
    c->bytes_sent += 4 * n;
    return push(c, MPI_Isend(buf, (int)n, MPI_FLOAT, to, tag, c->world, &req), &req, "sending to the next stage", err);
#else
    (void)c, (void)to, (void)tag, (void)buf, (void)n;
    return jm_fail(err, JM_ERR_ARG, "a build without MPI has no other ranks");
#endif
}

jm_status jm_comm_recv_start(jm_comm *c, int from, int tag, float *buf, int64_t n, jm_error *err)
{
#ifdef JM_MPI
    MPI_Request req;
    if (n > INT32_MAX) return jm_fail(err, JM_ERR_ARG, "message of %lld floats is too large", (long long)n);
    return push(c, MPI_Irecv(buf, (int)n, MPI_FLOAT, from, tag, c->world, &req), &req, "receiving", err);
#else
    (void)c, (void)from, (void)tag, (void)buf, (void)n;
    return jm_fail(err, JM_ERR_ARG, "a build without MPI has no other ranks");
#endif
}

jm_status jm_comm_allreduce_sum(jm_comm *c, jm_group g, double *buf, int n, const char *what, jm_error *err)
{
#ifdef JM_MPI
    if (group_size(c, g) > 1) {
        MPI_Request req;
        c->bytes_sent += 8 * (int64_t)n;
        jm_status s = push(c, MPI_Iallreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_SUM, group_comm(c, g), &req), &req,
                           what, err);
        return s ? s : jm_comm_wait(c, what, err);
    }
#endif
    (void)c, (void)g, (void)buf, (void)n, (void)what, (void)err;
    return JM_OK;
}

#ifdef JM_MPI
/* Counts and displacements in 16-float blocks (every piece is a multiple of 16 floats). */
static jm_status in_blocks(const jm_comm *c, int n, const int64_t *counts, const int64_t *displs, int *bc, int *bd,
                           jm_error *err)
{
    for (int i = 0; i < n; i++) {
        if (counts[i] % 16 || displs[i] % 16 || counts[i] / 16 > INT32_MAX || displs[i] / 16 > INT32_MAX)
            return jm_fail(err, JM_ERR_ARG, "rank %d: piece %d (%lld floats at %lld) is not in 16-float blocks",
                           c->rank, i, (long long)counts[i], (long long)displs[i]);
        bc[i] = (int)(counts[i] / 16);
        bd[i] = (int)(displs[i] / 16);
    }
    return JM_OK;
}
#endif

jm_status jm_comm_allgather(jm_comm *c, jm_group g, float *buf, const int64_t *counts, const int64_t *displs,
                            const char *what, jm_error *err)
{
#ifdef JM_MPI
    const int n = group_size(c, g);
    if (n > 1) {
        int *bc = malloc(sizeof(int) * (size_t)n), *bd = malloc(sizeof(int) * (size_t)n);
        jm_status s = !bc || !bd ? jm_fail(err, JM_ERR_NOMEM, "out of memory") : in_blocks(c, n, counts, displs, bc, bd, err);
        if (!s) {
            MPI_Request req;
            int me = g == JM_GROUP_DP ? c->replica : c->rank;
            c->bytes_sent += 4 * counts[me] * (n - 1);
            s = push(c, MPI_Iallgatherv(MPI_IN_PLACE, 0, c->block, buf, bc, bd, c->block, group_comm(c, g), &req),
                     &req, what, err);
            if (!s) s = jm_comm_wait(c, what, err);
        }
        free(bc);
        free(bd);
        return s;
    }
#endif
    (void)c, (void)g, (void)buf, (void)counts, (void)displs, (void)what, (void)err;
    return JM_OK;
}

jm_status jm_comm_gather0(jm_comm *c, const float *mine, float *all, const int64_t *counts, const int64_t *displs,
                          const char *what, jm_error *err)
{
#ifdef JM_MPI
    const int n = c->size;
    if (n > 1) {
        int *bc = malloc(sizeof(int) * (size_t)n), *bd = malloc(sizeof(int) * (size_t)n);
        jm_status s = !bc || !bd ? jm_fail(err, JM_ERR_NOMEM, "out of memory") : in_blocks(c, n, counts, displs, bc, bd, err);
        if (!s) {
            MPI_Request req;
            if (c->rank) c->bytes_sent += 4 * counts[c->rank];
            s = push(c, MPI_Igatherv(mine, bc[c->rank], c->block, all, bc, bd, c->block, 0, c->world, &req), &req,
                     what, err);
            if (!s) s = jm_comm_wait(c, what, err);
        }
        free(bc);
        free(bd);
        return s;
    }
#endif
    (void)c, (void)what, (void)err;
    if (all + displs[0] != mine) memcpy(all + displs[0], mine, sizeof(float) * (size_t)counts[0]);
    return JM_OK;
}

