/*-------------------------------------------------------------------------
 * redact.c
 *	  Masking Stripe keys in text: the one piece of key handling that is
 *	  plain C, kept apart so that the libFuzzer harness of the Stripe client
 *	  (test/fuzz/stripe_answer_fuzzer.c) runs the real code on Stripe's answers.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "redact.h"

/* Masks the configured key wherever it appears, and every key-shaped token. */
void
ub_redact_keys(char *msg, const char *key)
{
	static const char *const prefixes[] = {"sk_live_", "sk_test_", "rk_live_", "rk_test_"};
	char	   *p;
	int			i;

	if (msg == NULL)
		return;
	if (key && strlen(key) >= 4)
		while ((p = strstr(msg, key)) != NULL)
			memset(p, '*', strlen(key));
	for (i = 0; i < lengthof(prefixes); i++)
	{
		p = msg;
		while ((p = strstr(p, prefixes[i])) != NULL)
		{
			p += strlen(prefixes[i]);
			while (*p && !isspace((unsigned char) *p) && *p != '"' && *p != '\'' && *p != ',')
				*p++ = '*';
		}
	}
}
