/*-------------------------------------------------------------------------
 * stripe_answer_fuzzer.c
 *	  libFuzzer harness for the pure C part of the Stripe client: what the
 *	  export worker does with an HTTP answer (header lines, body chunks, the
 *	  error JSON, the classification into SENT / RETRY / FAILED) and how it
 *	  form-encodes the fields of a meter event.
 *
 * src/export/stripe_http.c (the HTTP layer: answer callbacks, error parser, retry
 * rule) and src/export/stripe_client.c (meter event classification) are included
 * whole so that their static functions can be called.  It is linked against libcurl, cJSON and the frontend builds of
 * libpgcommon / libpgport (palloc, StringInfo, snprintf, pg_prng); the few
 * backend symbols it references are stubbed below (src/util/redact.c, which masks
 * keys in what Stripe answers, is included too), and reaching ereport() or
 * CHECK_FOR_INTERRUPTS() from the fuzzed paths aborts (a finding).
 *
 * Input: the first byte chooses the mode, the rest is the data.
 *   mode 0  an HTTP answer: header lines up to the first empty line, then the
 *           body, delivered in chunks whose sizes come from the data
 *   mode 1  one form field value (NUL-free), encoded as the request does
 *   mode 2  the raw bytes handed to the Stripe error parser
 *-------------------------------------------------------------------------
 */
#include "../../src/export/stripe_http.c"
#include "../../src/export/stripe_client.c"
#include "../../src/util/redact.c"

#include <stdio.h>
#include <stdlib.h>

/* --- backend stubs -------------------------------------------------------- */

volatile sig_atomic_t InterruptPending = false;
sigjmp_buf *PG_exception_stack = NULL;
ErrorContextCallback *error_context_stack = NULL;

TimestampTz
GetCurrentTimestamp(void)
{
	return 0;
}

void
ProcessInterrupts(void)
{
	abort();
}

bool
errstart_cold(int elevel, const char *domain)
{
	fprintf(stderr, "ereport(%d) reached from a fuzzed path\n", elevel);
	abort();
}

void
errfinish(const char *filename, int lineno, const char *funcname)
{
	abort();
}

int
errcode(int sqlerrcode)
{
	return 0;
}

int
errmsg(const char *fmt,...)
{
	return 0;
}

void
pg_re_throw(void)
{
	abort();
}

/* --- the harness ---------------------------------------------------------- */

static const UbStripeConfig cfg = {
	.api_base = "http://127.0.0.1:1", .api_key = "sk_test_fuzz", .stripe_version = NULL,
	.concurrency = 1, .max_rps = 10, .connect_timeout_ms = 1000, .timeout_ms = 1000,
	.backoff_base_ms = 100, .backoff_max_ms = 60000
};

/* a NUL within the first n bytes of a fixed buffer, or abort */
static void
check_terminated(const char *buf, size_t n, const char *what)
{
	if (memchr(buf, '\0', n) == NULL)
	{
		fprintf(stderr, "%s is not NUL-terminated within its %zu bytes\n", what, n);
		abort();
	}
}

static void
fuzz_answer(const uint8_t *data, size_t size)
{
	static UbInflight req;			/* big: UB_HTTP_MAX_BODY */
	UbMeterEvent ev;
	size_t		pos = 0;
	CURLcode	result;

	memset(&req, 0, sizeof(req));
	memset(&ev, 0, sizeof(ev));
	ev.attempts = size > 0 ? data[0] % 40 : 0;
	result = (size > 1 && data[1] % 4 == 0) ? CURLE_OPERATION_TIMEDOUT : CURLE_OK;
	if (result != CURLE_OK && size > 2)
	{
		size_t		n = Min(size - 2, sizeof(req.ans.errbuf) - 1);

		memcpy(req.ans.errbuf, data + 2, n);
		req.ans.errbuf[n] = '\0';
	}
	pos = Min(size, 2);

	/* header lines up to an empty line */
	while (pos < size)
	{
		const uint8_t *nl = memchr(data + pos, '\n', size - pos);
		size_t		len = nl ? (size_t) (nl - (data + pos)) + 1 : size - pos;

		if (len == 1 || (len == 2 && data[pos] == '\r'))
		{
			pos += len;
			break;
		}
		ub_http_header_cb((char *) data + pos, 1, len, &req.ans);
		pos += len;
	}
	check_terminated(req.ans.request_id, sizeof(req.ans.request_id), "request_id");
	check_terminated(req.ans.retry_after, sizeof(req.ans.retry_after), "retry_after");
	check_terminated(req.ans.should_retry, sizeof(req.ans.should_retry), "should_retry");

	/* the body, in chunks */
	while (pos < size)
	{
		size_t		chunk = 1 + (data[pos] * 97u) % 8192;

		chunk = Min(chunk, size - pos);
		if (ub_http_write_cb((char *) data + pos, 1, chunk, &req.ans) != chunk)
			abort();
		pos += chunk;
	}
	if (req.ans.len > UB_HTTP_MAX_BODY || req.ans.body[req.ans.len] != '\0')
		abort();

	req.ev = &ev;
	req.http.easy = curl_easy_init();
	if (req.http.easy == NULL)
		return;
	(void) ub_inflight_finish(&req, result, &cfg);
	curl_easy_cleanup(req.http.easy);

	check_terminated(ev.error, sizeof(ev.error), "error");
	check_terminated(ev.request_id, sizeof(ev.request_id), "request_id");
	if (ev.outcome != UB_OUT_SENT && ev.outcome != UB_OUT_RETRY && ev.outcome != UB_OUT_FAILED)
		abort();
	if (ev.outcome == UB_OUT_RETRY && (ev.retry_in_ms < 0 || ev.retry_in_ms > 3600 * 1000))
		abort();
	/* the key never appears in what is recorded (unless the answer itself carried it) */
	if (strstr(ev.error, cfg.api_key) != NULL &&
		memmem(data, size, cfg.api_key, strlen(cfg.api_key)) == NULL)
	{
		fprintf(stderr, "the API key leaked into the error: %s\n", ev.error);
		abort();
	}
}

static void
fuzz_form_field(const uint8_t *data, size_t size)
{
	char	   *value = malloc(size + 1);
	StringInfoData buf;
	const char *p;

	memcpy(value, data, size);
	value[size] = '\0';
	initStringInfo(&buf);
	ub_http_form_add(&buf, "payload%5Bstripe_customer_id%5D", value);
	ub_http_form_add(&buf, "identifier", value);
	/* nothing but unreserved characters, %XX escapes and the separators */
	for (p = buf.data; *p; p++)
	{
		if (!(isalnum((unsigned char) *p) || strchr("-._~%=&", *p)))
		{
			fprintf(stderr, "unescaped byte 0x%02x in the form body\n", (unsigned char) *p);
			abort();
		}
	}
	pfree(buf.data);
	free(value);
}

static void
fuzz_error_json(const uint8_t *data, size_t size)
{
	UbStripeError err;

	ub_http_parse_error((const char *) data, size, &err);
	check_terminated(err.type, sizeof(err.type), "type");
	check_terminated(err.code, sizeof(err.code), "code");
	check_terminated(err.param, sizeof(err.param), "param");
	check_terminated(err.message, sizeof(err.message), "message");
}

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size == 0)
		return 0;
	switch (data[0] % 3)
	{
		case 0:
			fuzz_answer(data + 1, size - 1);
			break;
		case 1:
			fuzz_form_field(data + 1, size - 1);
			break;
		default:
			fuzz_error_json(data + 1, size - 1);
			break;
	}
	return 0;
}
