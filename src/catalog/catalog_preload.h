/*-------------------------------------------------------------------------
 * catalog_preload.h
 *	  Loading the whole catalog into a backend's cache in one pass.
 *-------------------------------------------------------------------------
 */
#ifndef UB_CATALOG_PRELOAD_H
#define UB_CATALOG_PRELOAD_H

extern int	ub_catalog_preload_limit;

extern void ub_catalog_preload_init(void);
extern bool ub_preload_catalog(void);

#endif							/* UB_CATALOG_PRELOAD_H */
