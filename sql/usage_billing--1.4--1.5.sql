-- usage_billing 1.4 -> 1.5: scale-out on Citus, Stripe reconciliation and v2 streams.
\echo Use "ALTER EXTENSION usage_billing UPDATE" to load this file. \quit

-- Sections are added below, one per subsystem; usage_billing--1.5.sql holds the same objects
-- for a fresh install.

-- ---------------------------------------------------------------------------
-- Stripe reconciliation and Connect (stripe_http.c, reconcile.c, reconcile_http.c)
--
-- Connect: a customer may belong to a connected account (stripe_account, acct_...); every
-- request about its events (meter events, cancels, event summaries) then carries the header
-- Stripe-Account.  An outbox row keeps the account it was planned for (filled in from the
-- customer when the row is written), so that a resend and a later cancel go where the event
-- went.
--
-- Reconciliation: the export worker reads Stripe's
-- GET /v1/billing/meters/{stripe_meter_id}/event_summaries per customer, meter and period
-- and compares Stripe's aggregated_value with what the database says Stripe holds
-- (export_state.exported).  A difference is recorded in stripe_reconciliation (view
-- stripe_drift) and corrected through the export's own bookkeeping: export_state is set to
-- what Stripe holds, so that the planner sends the difference (Stripe holds less, or a
-- formula-last meter holds another value) or the cancel planner cancels recent events
-- (Stripe holds more; what is older than export_cancel_window shows as needs_manual_credit).
-- ---------------------------------------------------------------------------

ALTER TABLE usage_billing.meters
    ADD COLUMN stripe_meter_id text CHECK (stripe_meter_id ~ '^[A-Za-z0-9_]{1,255}$');
COMMENT ON COLUMN usage_billing.meters.stripe_meter_id IS
    'The id of the Stripe meter (mtr_...) whose event_summaries reconciliation reads; NULL: not reconciled.';

ALTER TABLE usage_billing.customers
    ADD COLUMN stripe_account text CHECK (stripe_account ~ '^acct_[A-Za-z0-9]{1,250}$');
COMMENT ON COLUMN usage_billing.customers.stripe_account IS
    'Stripe Connect: the connected account (acct_...) the customer belongs to, sent as Stripe-Account; NULL: the platform account.';

ALTER TABLE usage_billing.export_outbox ADD COLUMN stripe_account text;
COMMENT ON COLUMN usage_billing.export_outbox.stripe_account IS
    'Stripe Connect: the account the event is sent to (the customer''s when the row was planned); NULL: the platform.';

-- Raises 22023 unless a Stripe Connect account id looks like one (acct_ and letters or digits).
CREATE FUNCTION usage_billing.check_stripe_account(stripe_account text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF stripe_account IS NOT NULL AND stripe_account !~ '^acct_[A-Za-z0-9]{1,250}$' THEN
        RAISE EXCEPTION 'invalid Stripe account id'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Field "stripe_account" has %s characters; a Stripe account id is "acct_" followed by 1 to 250 letters or digits.',
                                  length(stripe_account)),
                  HINT = 'Pass the id of the connected account, e.g. ''acct_1032D82eZvKYlo2C'', or NULL for the platform account.';
    END IF;
END
$$;
COMMENT ON FUNCTION usage_billing.check_stripe_account(text) IS
    'Internal: raises 22023 unless a Stripe account id is "acct_" followed by 1 to 250 letters or digits.';
REVOKE ALL ON FUNCTION usage_billing.check_stripe_account(text) FROM PUBLIC;

CREATE FUNCTION usage_billing.set_stripe_account(customer_id text, stripe_account text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Sets (or with NULL clears) the connected account of a customer.  Rows already planned keep
 * the account they were planned for; what is planned from now on goes to the new one.
 */
BEGIN
    PERFORM usage_billing.check_stripe_account(stripe_account);
    UPDATE usage_billing.customers c
       SET stripe_account = set_stripe_account.stripe_account, updated_at = now()
     WHERE c.customer_id = set_stripe_account.customer_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'customer "%" does not exist', customer_id
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$;
COMMENT ON FUNCTION usage_billing.set_stripe_account(text, text) IS
    'Stripe Connect: sets the connected account (acct_...) a customer''s events, cancels and summaries are sent to; NULL: the platform account.';
REVOKE ALL ON FUNCTION usage_billing.set_stripe_account(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.set_stripe_account(text, text) TO usage_billing_admin;

CREATE FUNCTION usage_billing.set_stripe_meter_id(meter text, stripe_meter_id text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF stripe_meter_id IS NOT NULL AND stripe_meter_id !~ '^[A-Za-z0-9_]{1,255}$' THEN
        RAISE EXCEPTION 'invalid Stripe meter id'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Field "stripe_meter_id" has %s characters; a Stripe meter id has 1 to 255 letters, digits or underscores.',
                                  length(stripe_meter_id)),
                  HINT = 'Pass the id Stripe returned for the meter, e.g. ''mtr_test_61Q8nQMqIFK9fRQmr41CMAXJrFdZ5MnA'', or NULL.';
    END IF;
    UPDATE usage_billing.meters m
       SET stripe_meter_id = set_stripe_meter_id.stripe_meter_id
     WHERE m.meter = set_stripe_meter_id.meter;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'meter "%" does not exist', meter
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$;
COMMENT ON FUNCTION usage_billing.set_stripe_meter_id(text, text) IS
    'Sets the Stripe meter id (mtr_...) whose event summaries the export worker reconciles a meter with; NULL: not reconciled.';
REVOKE ALL ON FUNCTION usage_billing.set_stripe_meter_id(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.set_stripe_meter_id(text, text) TO usage_billing_admin;

-- an outbox row keeps the account of its customer at planning time
CREATE FUNCTION usage_billing.export_outbox_account()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- rows being planned (never attempted): a restored row keeps what it had
    IF NEW.stripe_account IS NULL AND NEW.attempts = 0 THEN
        NEW.stripe_account := (SELECT c.stripe_account FROM usage_billing.customers c
                                WHERE c.customer_id = NEW.customer_id);
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION usage_billing.export_outbox_account() IS
    'Internal trigger: fills export_outbox.stripe_account from the customer (Stripe Connect).';
REVOKE ALL ON FUNCTION usage_billing.export_outbox_account() FROM PUBLIC;
CREATE TRIGGER export_outbox_account BEFORE INSERT ON usage_billing.export_outbox
    FOR EACH ROW EXECUTE FUNCTION usage_billing.export_outbox_account();

CREATE TABLE usage_billing.stripe_reconciliation (
    customer_id        text NOT NULL,
    meter              text NOT NULL,
    period_start       timestamptz NOT NULL,
    period_end         timestamptz NOT NULL,
    stripe_customer_id text,
    stripe_account     text,
    stripe_meter_id    text,
    status             text NOT NULL
                       CHECK (status IN ('in_sync', 'resending', 'cancelling', 'not_correctable',
                                         'skipped', 'error')),
    stripe_value       numeric,
    expected           numeric,
    drift              numeric,
    detail             text,
    checked_at         timestamptz NOT NULL DEFAULT now(),
    request_id         text,
    last_drift         numeric,
    last_drift_at      timestamptz,
    corrections        integer NOT NULL DEFAULT 0,
    PRIMARY KEY (customer_id, meter, period_start)
);
COMMENT ON TABLE usage_billing.stripe_reconciliation IS
    'The last comparison of Stripe''s event summary with the database per customer, meter and period (export worker), and what was done about a difference.';
COMMENT ON COLUMN usage_billing.stripe_reconciliation.stripe_value IS
    'Stripe''s aggregated_value for the period (GET /v1/billing/meters/{id}/event_summaries).';
COMMENT ON COLUMN usage_billing.stripe_reconciliation.expected IS
    'What the database said Stripe holds (export_state.exported) when Stripe was read.';
COMMENT ON COLUMN usage_billing.stripe_reconciliation.drift IS
    'stripe_value - expected: above 0 Stripe holds more (cancelled within the cancel window, else a manual credit), below 0 less (sent again).';
COMMENT ON COLUMN usage_billing.stripe_reconciliation.status IS
    'in_sync; resending (the difference is planned as a new event); cancelling (recent events are cancelled); not_correctable (needs a hand: see detail); skipped (events or cancels in flight, or sent within usage_billing.reconcile_settle); error (Stripe''s summary could not be read: see detail).';
ALTER TABLE usage_billing.stripe_reconciliation ENABLE ROW LEVEL SECURITY;
CREATE POLICY staff_all ON usage_billing.stripe_reconciliation FOR ALL
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader
    USING (true) WITH CHECK (true);
CREATE POLICY tenant_own_rows ON usage_billing.stripe_reconciliation FOR SELECT TO PUBLIC
    USING (customer_id = (SELECT usage_billing.current_customer_id()));
REVOKE ALL ON usage_billing.stripe_reconciliation FROM PUBLIC;
GRANT SELECT ON usage_billing.stripe_reconciliation
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader;

CREATE VIEW usage_billing.stripe_drift WITH (security_invoker = true) AS
SELECT r.customer_id, r.meter, r.period_start, r.period_end, r.stripe_customer_id,
       r.stripe_account, r.stripe_meter_id, r.stripe_value, r.expected, r.drift, r.status,
       r.detail, r.checked_at, r.last_drift, r.last_drift_at, r.corrections
  FROM usage_billing.stripe_reconciliation r
 WHERE r.status IN ('resending', 'cancelling', 'not_correctable', 'error')
    OR coalesce(r.drift, 0) <> 0;
COMMENT ON VIEW usage_billing.stripe_drift IS
    'Where Stripe differed from the database at the last reconciliation (or could not be read), and what is being done about it.';
REVOKE ALL ON usage_billing.stripe_drift FROM PUBLIC;
GRANT SELECT ON usage_billing.stripe_drift
    TO usage_billing_admin, usage_billing_writer, usage_billing_reader;

-- The export worker: the keys to read from Stripe, least recently checked first (and not
-- checked since checked_before: a pass cut by its time budget resumes where it stopped).
CREATE FUNCTION usage_billing.reconcile_candidates(customer_id text, meter text, max_rows integer,
                                                   checked_before timestamptz)
RETURNS TABLE (customer_id text, meter text, period_start timestamptz, period_end timestamptz,
               stripe_customer_id text, stripe_account text, stripe_meter_id text,
               exported numeric)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.customer_id, s.meter, s.period_start, a.period_end, c.stripe_customer_id,
           c.stripe_account, m.stripe_meter_id, s.exported
      FROM usage_billing.export_state s
      JOIN usage_billing.customers c ON c.customer_id = s.customer_id
      JOIN usage_billing.meters m ON m.meter = s.meter
      JOIN usage_billing.aggregate_totals a
        ON a.customer_id = s.customer_id AND a.meter = s.meter AND a.period_start = s.period_start
      LEFT JOIN usage_billing.stripe_reconciliation r
        ON r.customer_id = s.customer_id AND r.meter = s.meter AND r.period_start = s.period_start
     WHERE m.stripe_meter_id IS NOT NULL AND m.stripe_event_name IS NOT NULL
       AND c.stripe_customer_id IS NOT NULL
       AND a.period_end > now() - interval '35 days'
       AND (reconcile_candidates.customer_id IS NULL OR s.customer_id = reconcile_candidates.customer_id)
       AND (reconcile_candidates.meter IS NULL OR s.meter = reconcile_candidates.meter)
       AND (r.checked_at IS NULL OR r.checked_at < checked_before)
     ORDER BY r.checked_at NULLS FIRST, s.period_start, s.customer_id, s.meter
     LIMIT max_rows
$$;
COMMENT ON FUNCTION usage_billing.reconcile_candidates(text, text, integer, timestamptz) IS
    'Internal (export worker): the customer, meter and period keys to compare with Stripe, least recently checked first.';
REVOKE ALL ON FUNCTION usage_billing.reconcile_candidates(text, text, integer, timestamptz) FROM PUBLIC;

-- The export worker: compares what Stripe answered with the database and corrects.
CREATE FUNCTION usage_billing.reconcile_record(
    customer_id text, meter text, period_start timestamptz, period_end timestamptz,
    stripe_value numeric, exported_seen numeric, error text, request_id text,
    settle interval, cancel_window interval)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Under the export's lock: a key with events or cancels in flight, or one sent within
 * "settle" (Stripe's summaries lag behind), is skipped; so is one whose exported level moved
 * since Stripe was read.  Else drift = stripe_value - exported; export_state is set to what
 * Stripe holds, so that the export itself corrects it: sum/count meters get the missing
 * difference planned as a new event, or an excess cancelled among the events sent within
 * cancel_window (the rest shows as needs_manual_credit); formula-last meters get the current
 * value sent again.  A key whose events went to another Stripe customer or account than the
 * current one is not corrected (not_correctable).  Returns the status recorded.
 */
DECLARE
    s usage_billing.export_state%ROWTYPE;
    c usage_billing.customers%ROWTYPE;
    additive boolean;
    d numeric;
    st text;
    det text;
    cancellable numeric;
BEGIN
    PERFORM pg_advisory_xact_lock(7245170349586201);
    SELECT * INTO s FROM usage_billing.export_state x
     WHERE x.customer_id = reconcile_record.customer_id AND x.meter = reconcile_record.meter
       AND x.period_start = reconcile_record.period_start
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO c FROM usage_billing.customers x WHERE x.customer_id = reconcile_record.customer_id;
    SELECT m.aggregation IN ('sum', 'count') INTO additive
      FROM usage_billing.meters m WHERE m.meter = reconcile_record.meter;

    IF error IS NOT NULL THEN
        st := 'error';
        det := error;
    ELSIF EXISTS (SELECT 1 FROM usage_billing.export_outbox o
                   WHERE o.customer_id = s.customer_id AND o.meter = s.meter
                     AND o.period_start = s.period_start AND o.status IN ('pending', 'failed'))
          OR EXISTS (SELECT 1 FROM usage_billing.export_cancels x
                      WHERE x.customer_id = s.customer_id AND x.meter = s.meter
                        AND x.period_start = s.period_start AND x.status = 'pending')
          OR s.exported IS DISTINCT FROM exported_seen
          OR (additive AND s.planned <> s.exported) THEN
        st := 'skipped';
        det := 'events or cancels of the period are in flight';
    ELSIF EXISTS (SELECT 1 FROM usage_billing.export_outbox o
                   WHERE o.customer_id = s.customer_id AND o.meter = s.meter
                     AND o.period_start = s.period_start AND o.sent_at > clock_timestamp() - settle)
          OR EXISTS (SELECT 1 FROM usage_billing.export_cancels x
                      WHERE x.customer_id = s.customer_id AND x.meter = s.meter
                        AND x.period_start = s.period_start AND x.done_at > clock_timestamp() - settle) THEN
        st := 'skipped';
        det := 'sent within usage_billing.reconcile_settle: Stripe''s summary may not show it yet';
    ELSE
        d := stripe_value - s.exported;
        IF d = 0 THEN
            st := 'in_sync';
        ELSIF EXISTS (SELECT 1 FROM usage_billing.export_outbox o
                       WHERE o.customer_id = s.customer_id AND o.meter = s.meter
                         AND o.period_start = s.period_start AND o.status = 'sent'
                         AND (o.stripe_customer_id IS DISTINCT FROM c.stripe_customer_id
                              OR o.stripe_account IS DISTINCT FROM c.stripe_account)) THEN
            st := 'not_correctable';
            det := format('Stripe holds %s where %s was sent, but events of this period went to another Stripe customer or account than the current one: compare by hand',
                          stripe_value, s.exported);
        ELSIF additive AND d < 0 THEN
            UPDATE usage_billing.export_state x
               SET planned = x.planned + d, exported = x.exported + d
             WHERE x.customer_id = s.customer_id AND x.meter = s.meter AND x.period_start = s.period_start;
            st := 'resending';
            det := format('Stripe holds %s less than was sent: the difference is sent again', -d);
        ELSIF additive THEN
            UPDATE usage_billing.export_state x
               SET planned = x.planned + d, exported = x.exported + d
             WHERE x.customer_id = s.customer_id AND x.meter = s.meter AND x.period_start = s.period_start;
            SELECT coalesce(sum(o.value), 0) INTO cancellable
              FROM usage_billing.export_outbox o
             WHERE o.customer_id = s.customer_id AND o.meter = s.meter AND o.period_start = s.period_start
               AND o.status = 'sent' AND o.additive AND o.value > 0
               AND o.created_at > clock_timestamp() - coalesce(cancel_window, interval '0')
               AND NOT EXISTS (SELECT 1 FROM usage_billing.export_cancels x WHERE x.identifier = o.identifier);
            IF cancellable >= d THEN
                st := 'cancelling';
                det := format('Stripe holds %s more than was sent: recent events are cancelled and the difference sent again', d);
            ELSE
                st := 'not_correctable';
                det := format('Stripe holds %s more than was sent and only %s can still be cancelled: credit the rest by hand (export_status.needs_manual_credit)',
                              d, cancellable);
            END IF;
        ELSE
            UPDATE usage_billing.export_state x
               SET planned = reconcile_record.stripe_value, exported = reconcile_record.stripe_value
             WHERE x.customer_id = s.customer_id AND x.meter = s.meter AND x.period_start = s.period_start;
            st := 'resending';
            det := format('Stripe holds %s where %s was sent: the current value is sent again', stripe_value, s.exported);
        END IF;
    END IF;

    INSERT INTO usage_billing.stripe_reconciliation AS r
        (customer_id, meter, period_start, period_end, stripe_customer_id, stripe_account,
         stripe_meter_id, status, stripe_value, expected, drift, detail, checked_at, request_id,
         last_drift, last_drift_at, corrections)
    SELECT s.customer_id, s.meter, s.period_start, reconcile_record.period_end, c.stripe_customer_id,
           c.stripe_account, m.stripe_meter_id, st,
           CASE WHEN st <> 'error' THEN stripe_value END, s.exported,
           CASE WHEN st NOT IN ('error', 'skipped') THEN d END, det, clock_timestamp(),
           reconcile_record.request_id,
           CASE WHEN coalesce(d, 0) <> 0 AND st <> 'skipped' THEN d END,
           CASE WHEN coalesce(d, 0) <> 0 AND st <> 'skipped' THEN clock_timestamp() END,
           CASE WHEN st IN ('resending', 'cancelling') THEN 1 ELSE 0 END
      FROM usage_billing.meters m WHERE m.meter = s.meter
    ON CONFLICT ON CONSTRAINT stripe_reconciliation_pkey DO UPDATE
       SET period_end = EXCLUDED.period_end, stripe_customer_id = EXCLUDED.stripe_customer_id,
           stripe_account = EXCLUDED.stripe_account, stripe_meter_id = EXCLUDED.stripe_meter_id,
           status = EXCLUDED.status, stripe_value = EXCLUDED.stripe_value,
           expected = EXCLUDED.expected, drift = EXCLUDED.drift, detail = EXCLUDED.detail,
           checked_at = EXCLUDED.checked_at, request_id = EXCLUDED.request_id,
           last_drift = coalesce(EXCLUDED.last_drift, r.last_drift),
           last_drift_at = coalesce(EXCLUDED.last_drift_at, r.last_drift_at),
           corrections = r.corrections + EXCLUDED.corrections;
    RETURN st;
END
$$;
COMMENT ON FUNCTION usage_billing.reconcile_record(text, text, timestamptz, timestamptz, numeric, numeric, text, text, interval, interval) IS
    'Internal (export worker): compares Stripe''s summary of a period with the database, records the result and corrects the export''s bookkeeping.';
REVOKE ALL ON FUNCTION usage_billing.reconcile_record(text, text, timestamptz, timestamptz, numeric, numeric, text, text, interval, interval) FROM PUBLIC;

CREATE FUNCTION usage_billing.reconcile_request(customer_id text, meter text, timeout_ms integer)
RETURNS boolean
AS 'MODULE_PATHNAME', 'ub_reconcile_request'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION usage_billing.reconcile_request(text, text, integer) IS
    'Internal (reconcile_stripe): asks the export worker to reconcile now and waits for it at most timeout_ms; true when it finished.';
REVOKE ALL ON FUNCTION usage_billing.reconcile_request(text, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.reconcile_request(text, text, integer) TO usage_billing_admin;

CREATE FUNCTION usage_billing.reconcile_stripe(p_customer_id text DEFAULT NULL, p_meter text DEFAULT NULL)
RETURNS TABLE (customer_id text, meter text, period_start timestamptz, period_end timestamptz,
               stripe_value numeric, expected numeric, drift numeric, status text, detail text,
               checked_at timestamptz)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
/*
 * Asks the export worker to read Stripe's summaries now (of one customer and/or meter, or all)
 * and waits for it (at most 60 s); the HTTP requests are the worker's, outside this
 * transaction.  Returns the results of the keys asked for.  Call it outside an explicit
 * transaction that holds locks on the export's tables: the worker needs them.
 */
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'reconcile_stripe() needs the read committed isolation level'
            USING ERRCODE = 'active_sql_transaction',
                  DETAIL = 'It waits for the export worker and then reads what the worker committed.',
                  HINT = 'Call it in its own transaction at the default isolation level.';
    END IF;
    IF NOT usage_billing.reconcile_request(p_customer_id, p_meter, 60000) THEN
        RAISE WARNING 'the export worker did not reconcile'
            USING DETAIL = 'It is not running, has no Stripe API key, failed, or did not finish within 60 s; the rows shown are the results of the last reconciliation.',
                  HINT = 'See usage_billing.export_status.reason and the server log.';
    END IF;
    RETURN QUERY
    SELECT r.customer_id, r.meter, r.period_start, r.period_end, r.stripe_value, r.expected,
           r.drift, r.status, r.detail, r.checked_at
      FROM usage_billing.stripe_reconciliation r
     WHERE (p_customer_id IS NULL OR r.customer_id = p_customer_id)
       AND (p_meter IS NULL OR r.meter = p_meter)
     ORDER BY r.customer_id, r.meter, r.period_start;
END
$$;
COMMENT ON FUNCTION usage_billing.reconcile_stripe(text, text) IS
    'Compares Stripe''s event summaries with the database now (through the export worker) and corrects what can be corrected; returns the results.';
REVOKE ALL ON FUNCTION usage_billing.reconcile_stripe(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION usage_billing.reconcile_stripe(text, text) TO usage_billing_admin;

-- export_status: never in_sync while reconciliation knows Stripe differs and cannot correct it
-- (state stripe_drift); what Stripe held at the last check, and when (the 1.4 view plus two
-- columns at the end).  Drift that is being corrected shows through export_state already:
-- pending (Stripe holds less), cancelling or needs_manual_credit (Stripe holds more).
CREATE OR REPLACE VIEW usage_billing.export_status WITH (security_invoker = true) AS
SELECT a.customer_id, a.meter, a.period_start, a.period_end,
       c.stripe_customer_id,
       m.stripe_event_name AS event_name,
       m.aggregation,
       a.total,
       floor(a.total) AS target,
       coalesce(s.exported, 0) AS exported,
       CASE WHEN m.aggregation IN ('sum', 'count')
            THEN greatest(floor(a.total) - coalesce(s.exported, 0), 0)
            WHEN floor(a.total) = coalesce(s.exported, 0) THEN 0
            ELSE floor(a.total) END AS pending,
       coalesce(o.failed, 0) AS failed,
       coalesce(o.pending_events, 0) AS pending_events,
       coalesce(o.failed_events, 0) AS failed_events,
       CASE WHEN m.aggregation IN ('sum', 'count')
            THEN greatest(coalesce(s.planned, 0) - floor(a.total) - coalesce(x.cancelling, 0)
                          - coalesce(k.cancellable, 0), 0)
            ELSE 0 END AS needs_manual_credit,
       coalesce(s.attempts, 0) AS attempts,
       s.last_attempt_at,
       s.last_http_status,
       s.last_request_id,
       coalesce(o.failed_error, s.last_error) AS last_error,
       st.state,
       coalesce(x.cancelling, 0) AS cancelling,
       coalesce(x.cancelled, 0) AS cancelled,
       CASE st.state
            WHEN 'in_sync' THEN NULL
            WHEN 'no_stripe_customer' THEN 'the customer has no stripe_customer_id'
            WHEN 'failed' THEN coalesce(o.failed_error, s.last_error, 'Stripe refused the events')
            WHEN 'needs_manual_credit' THEN
                'Stripe holds more than the total and the excess can no longer be cancelled: credit it by hand'
            WHEN 'cancelling' THEN 'cancelling events Stripe holds above the total'
            WHEN 'stripe_drift' THEN rc.detail
            ELSE coalesce(b.blocker,
                          CASE WHEN a.total < 0 THEN 'the total is negative: nothing is sent'
                               WHEN coalesce(o.pending_events, 0) > 0 THEN 'sent or being sent, waiting for Stripe''s answer'
                               ELSE 'waiting for the next export cycle' END)
            END AS reason,
       rc.stripe_value,
       rc.checked_at AS stripe_checked_at
  FROM usage_billing.aggregate_totals a
  JOIN usage_billing.meters m ON m.meter = a.meter AND m.stripe_event_name IS NOT NULL
  JOIN usage_billing.customers c ON c.customer_id = a.customer_id
  LEFT JOIN usage_billing.export_state s
         ON s.customer_id = a.customer_id AND s.meter = a.meter AND s.period_start = a.period_start
  LEFT JOIN LATERAL (
        SELECT sum(ob.value) FILTER (WHERE ob.status = 'failed') AS failed,
               count(*) FILTER (WHERE ob.status = 'pending') AS pending_events,
               count(*) FILTER (WHERE ob.status = 'failed') AS failed_events,
               max(ob.last_error) FILTER (WHERE ob.status = 'failed') AS failed_error
          FROM usage_billing.export_outbox ob
         WHERE ob.customer_id = a.customer_id AND ob.meter = a.meter
           AND ob.period_start = a.period_start AND ob.status IN ('pending', 'failed')) o ON true
  LEFT JOIN LATERAL (
        SELECT sum(xc.value) FILTER (WHERE xc.status = 'pending') AS cancelling,
               sum(xc.value) FILTER (WHERE xc.status = 'cancelled') AS cancelled
          FROM usage_billing.export_cancels xc
         WHERE xc.customer_id = a.customer_id AND xc.meter = a.meter
           AND xc.period_start = a.period_start) x ON true
  LEFT JOIN LATERAL (
        -- what the worker can still cancel (usage_billing.export_cancel_window, default 23 h);
        -- a pending event counts too: it becomes cancellable once Stripe confirms it
        SELECT sum(ob.value) AS cancellable
          FROM usage_billing.export_outbox ob
         WHERE m.aggregation IN ('sum', 'count') AND coalesce(s.planned, 0) > floor(a.total)
           AND ob.customer_id = a.customer_id AND ob.meter = a.meter
           AND ob.period_start = a.period_start AND ob.status IN ('sent', 'pending') AND ob.additive
           AND ob.created_at > clock_timestamp()
                 - coalesce(nullif(pg_catalog.current_setting('usage_billing.export_cancel_window', true), ''),
                            '23h')::interval
           AND NOT EXISTS (SELECT 1 FROM usage_billing.export_cancels xc
                            WHERE xc.identifier = ob.identifier)) k ON true
  LEFT JOIN usage_billing.stripe_reconciliation rc
         ON rc.customer_id = a.customer_id AND rc.meter = a.meter AND rc.period_start = a.period_start
 CROSS JOIN LATERAL (
        SELECT CASE WHEN c.stripe_customer_id IS NULL THEN 'no_stripe_customer'
                    WHEN coalesce(o.failed_events, 0) > 0 THEN 'failed'
                    WHEN m.aggregation IN ('sum', 'count') AND coalesce(s.planned, 0) > floor(a.total)
                         AND coalesce(s.planned, 0) - floor(a.total)
                             > coalesce(x.cancelling, 0) + coalesce(k.cancellable, 0)
                         THEN 'needs_manual_credit'
                    WHEN m.aggregation IN ('sum', 'count') AND coalesce(s.planned, 0) > floor(a.total)
                         THEN 'cancelling'
                    WHEN rc.status = 'not_correctable' AND coalesce(rc.drift, 0) <> 0 THEN 'stripe_drift'
                    WHEN coalesce(s.exported, 0) = floor(a.total) THEN 'in_sync'
                    ELSE 'pending' END AS state) st
 CROSS JOIN (SELECT usage_billing.export_blocker() AS blocker) b;

COMMENT ON COLUMN usage_billing.export_status.stripe_value IS
    'Stripe''s aggregated_value for the period at the last reconciliation (NULL: not read yet).';
COMMENT ON COLUMN usage_billing.export_status.stripe_checked_at IS
    'When reconciliation last compared the period with Stripe.';

-- ---------------------------------------------------------------------------
-- Security: the tenants' policies of the escrow slots and reservations say what they do
-- ---------------------------------------------------------------------------
COMMENT ON POLICY tenant_own_rows ON usage_billing.usage_aggregate_slots IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';
COMMENT ON POLICY tenant_own_rows ON usage_billing.reservations IS
    'Any other role sees the rows of the customer named by its request: usage_billing.current_customer_id().';
