/*-------------------------------------------------------------------------
 * export_shmem.h
 *	  Shared state of the export worker: who it is and how to wake it.
 *-------------------------------------------------------------------------
 */
#ifndef UB_SHMEM_H
#define UB_SHMEM_H

#include "storage/latch.h"

extern void ub_export_shmem_request(void);
extern void ub_export_shmem_startup(void);
extern bool ub_shmem_available(void);
extern void ub_shmem_set_worker(Latch *latch);
extern void ub_shmem_clear_worker(void);
extern pid_t ub_shmem_wake_worker(void);
extern bool ub_shmem_take_wake(void);
extern void ub_shmem_count_cycle(int64 sent, int64 failed);
extern void ub_shmem_read_stats(pid_t *pid, int64 *cycles, int64 *sent, int64 *failed);

#endif							/* UB_SHMEM_H */
