/* comm.h — the process grid of a training run and the messages between its
 * ranks (comm.c), over MPI (Open MPI from Debian, started by mpirun or srun).
 *
 * A run of N ranks is P pipeline stages x N/P data-parallel replicas; world
 * rank = replica * P + stage, so the stages of one replica are neighbours.
 * Every wait has a deadline: a rank that died or hangs makes the others stop
 * with a message naming what they were waiting for, instead of hanging. A
 * build without MPI (make MPI=0) runs one process and refuses to start as one
 * of several ranks (N copies would write one run directory). */
#ifndef JM_COMM_H
#define JM_COMM_H

#include "base/base.h"

typedef struct jm_comm jm_comm;

typedef enum {
    JM_GROUP_WORLD, /* every rank */
    JM_GROUP_DP,    /* the replicas of this rank's stage */
} jm_group;

/* Joins the run's ranks (MPI_Init when launched as one of several) and
 * arranges them as pp stages x size/pp replicas. timeout: seconds a wait may
 * last before the rank gives up on the others (<= 0: the default). */
jm_status jm_comm_open(int pp, double timeout, jm_comm **out, jm_error *err);
/* Leaves the grid; failed: this rank stops on an error, so the whole job is
 * stopped (MPI_Abort) rather than left waiting for it. */
void jm_comm_close(jm_comm *c, int failed);

int jm_comm_rank(const jm_comm *c);    /* world rank */
int jm_comm_size(const jm_comm *c);    /* world size */
int jm_comm_pp(const jm_comm *c);      /* stages */
int jm_comm_dp(const jm_comm *c);      /* replicas */
int jm_comm_stage(const jm_comm *c);   /* this rank's stage */
int jm_comm_replica(const jm_comm *c); /* this rank's replica */
int jm_comm_local_size(const jm_comm *c); /* ranks on this host (for a fair share of its cores) */

/* World rank of (replica, stage). */
static inline int jm_comm_rank_of(const jm_comm *c, int replica, int stage)
{
    return replica * jm_comm_pp(c) + stage;
}

/* Collectives. Each blocks until done or the deadline; "what" names the step
 * for the message. Counts are per rank of the group, in group order. */
jm_status jm_comm_allreduce_sum(jm_comm *c, jm_group g, double *buf, int n, const char *what, jm_error *err);
/* In place over buf: rank i's piece is buf[displs[i] .. + counts[i]), sent to all. */
jm_status jm_comm_allgather(jm_comm *c, jm_group g, float *buf, const int64_t *counts, const int64_t *displs,
                            const char *what, jm_error *err);
/* Rank 0 of the world receives every rank's piece (mine: counts[rank] floats)
 * into all (rank 0 only) at its displacement. */
jm_status jm_comm_gather0(jm_comm *c, const float *mine, float *all, const int64_t *counts, const int64_t *displs,
                          const char *what, jm_error *err);

/* Started operations, finished by jm_comm_wait (which waits for every started
 * one); jm_comm_poll lets them progress while the caller computes. */
/* The sum of send (n floats, the same layout on every rank of g) scattered:
 * rank i of g receives counts[i] floats into its recv. */
jm_status jm_comm_reduce_scatter_start(jm_comm *c, jm_group g, const float *send, float *recv, const int *counts,
                                       jm_error *err);
jm_status jm_comm_send_start(jm_comm *c, int to, int tag, const float *buf, int64_t n, jm_error *err);
jm_status jm_comm_recv_start(jm_comm *c, int from, int tag, float *buf, int64_t n, jm_error *err);
jm_status jm_comm_wait(jm_comm *c, const char *what, jm_error *err);
void jm_comm_poll(jm_comm *c);

/* Bytes this rank sent, and seconds it spent waiting for the others, so far
 * (metrics.jsonl's comm_mb and comm_wait; bench/scale). */
int64_t jm_comm_bytes_sent(const jm_comm *c);
double jm_comm_wait_seconds(const jm_comm *c);

#endif
