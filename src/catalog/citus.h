/*-------------------------------------------------------------------------
 * citus.h
 *	  Whether the schema is distributed with Citus on this node.
 *-------------------------------------------------------------------------
 */
#ifndef UB_CITUS_H
#define UB_CITUS_H

extern bool ub_distributed(void);
extern bool ub_citus_coordinator(void);

#endif							/* UB_CITUS_H */
