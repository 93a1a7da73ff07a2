/*-------------------------------------------------------------------------
 * redact.h
 *	  Masking Stripe keys in text (redact.c).
 *-------------------------------------------------------------------------
 */
#ifndef UB_REDACT_H
#define UB_REDACT_H

extern void ub_redact_keys(char *msg, const char *key);

#endif							/* UB_REDACT_H */
