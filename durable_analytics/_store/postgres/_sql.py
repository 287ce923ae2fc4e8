"""The PostgreSQL queue's statements; ``{s}`` stands for the quoted schema name.

Every time comes from the server's ``now()``. A ``not_before`` further away than the
``horizon`` (the longest backoff plus a margin) can only come from a clock that jumped, and
is ignored, as the contract says.
"""

from __future__ import annotations

_READY_MSG = (
    "(m.not_before IS NULL OR m.not_before <= now() "
    "OR m.not_before > now() + %(horizon)s * interval '1 second')"
)
_READY_DEST = (
    "(d.not_before IS NULL OR d.not_before <= now() "
    "OR d.not_before > now() + %(horizon)s * interval '1 second')"
)
_UNLEASED = "(m.lease_expires IS NULL OR m.lease_expires < now())"


def _of(dest: str, top: str = "9223372036854775807") -> str:
    """Messages of ``dest`` up to id ``top``, as a range of the (dest, id) index.

    A row comparison, not ``m.dest = ... AND m.id <= ...``: with an equality on dest the
    planner reduces "ORDER BY m.dest, m.id" to "ORDER BY m.id" and walks the primary key,
    reading every other destination's rows on the way (its statistics cannot tell that
    this destination holds few of them). A range of (dest, id) only that index serves.
    """
    return f"(m.dest, m.id) BETWEEN ({dest}, 0) AND ({dest}, {top})"


DESTINATION = """
WITH ins AS (
    INSERT INTO {s}.destinations (host, write_key) VALUES (%(host)s, %(key)s)
    ON CONFLICT (host, write_key) DO NOTHING RETURNING id
)
SELECT id FROM ins
UNION ALL
SELECT id FROM {s}.destinations WHERE host = %(host)s AND write_key = %(key)s
LIMIT 1
"""

INSERT = (
    "INSERT INTO {s}.messages (dest, body, size, enqueued_at) "
    "VALUES (%s, %s, %s, coalesce(to_timestamp(%s::float8), now())) RETURNING id"
)

INSTANCE = "SELECT value FROM {s}.meta WHERE key = 'instance'"

# A destination's window has room while its live leases (rows of ``leases`` not expired)
# are fewer than its window (``_window.py``); ``%(max)s`` is this queue's
# ``fleet_max_in_flight``. Run after the destination's window lock, in a statement of its
# own, this count sees every lease committed before the lock was granted.
ROOM = (
    "((SELECT count(*) FROM {s}.leases l WHERE l.dest = d.id AND l.expires >= now()) "
    "< least(floor(coalesce(d.window_limit, %(max)s)), %(max)s))"
)

# The destination of the next lease: the one whose oldest ready message is oldest, among
# those not backing off and with room in their window (a hint: ``LEASE`` checks again).
# Each destination is asked for its own oldest ready message on the (dest, id) index, so a
# destination's backlog in backoff is never read (scanning messages in id order would
# walk past all of it; see ``_of``).
_FIRST = f"""
    SELECT d.id AS dest FROM {{s}}.destinations d
    CROSS JOIN LATERAL (
        SELECT m.id FROM {{s}}.messages m
        WHERE {_of("d.id", "%(top)s")} AND {_UNLEASED} AND {_READY_MSG}
        ORDER BY m.dest, m.id LIMIT 1
        {{lock}}
    ) f
    WHERE {_READY_DEST} AND (%(dest)s::bigint IS NULL OR d.id = %(dest)s::bigint) AND {ROOM}
    ORDER BY f.id LIMIT 1
"""

# Chooses the destination and takes its window lock (until the transaction ends), so that
# two holders never both take its last slot.
CHOOSE = f"""
WITH first AS ({_FIRST.replace("{lock}", "")})
SELECT dest, pg_advisory_xact_lock(%(cls)s::int4, mod(dest, 2147483648)::int4) FROM first
"""

# The oldest ready messages of the chosen destination (whose window lock is held), within
# the count and the byte budget (the first always), are stamped with the token, and the
# lease is entered in ``leases`` (one slot of the window). SKIP LOCKED: rows another
# holder is leasing right now are not waited for.
LEASE = f"""
WITH first AS ({_FIRST.replace("{lock}", "FOR UPDATE OF m SKIP LOCKED")}
), cand AS (
    SELECT m.id, m.size FROM {{s}}.messages m
    WHERE {_of("(SELECT dest FROM first)", "%(top)s")} AND {_UNLEASED} AND {_READY_MSG}
    ORDER BY m.dest, m.id LIMIT %(n)s
    FOR UPDATE OF m SKIP LOCKED
), pick AS (
    SELECT id FROM (
        SELECT id, sum(size + %(overhead)s) OVER (ORDER BY id) AS running,
               row_number() OVER (ORDER BY id) AS rn
        FROM cand
    ) s
    WHERE running <= %(max_bytes)s OR rn = 1
), entered AS (
    INSERT INTO {{s}}.leases (token, dest, holder, expires)
    SELECT %(token)s, dest, %(holder)s::bigint, now() + %(timeout)s * interval '1 second'
    FROM first WHERE EXISTS (SELECT 1 FROM pick)
), capped AS (
    UPDATE {{s}}.destinations
    SET window_max = %(max)s, window_limit = least(coalesce(window_limit, %(max)s), %(max)s)
    WHERE id = (SELECT dest FROM first) AND window_max IS DISTINCT FROM %(max)s
)
UPDATE {{s}}.messages m
SET lease_token = %(token)s, lease_expires = now() + %(timeout)s * interval '1 second',
    lease_holder = %(holder)s::bigint
FROM pick, {{s}}.destinations d
WHERE m.id = pick.id AND d.id = m.dest
RETURNING m.id, m.dest, d.host, d.write_key, d.failures, m.body, m.attempts, d.window_epoch
"""

# The lease's row in ``leases`` is extended too, or entered again when a reclaim had
# removed it as expired while its messages were still untouched.
EXTEND = """
WITH kept AS (
    UPDATE {s}.messages SET lease_expires = now() + %(timeout)s * interval '1 second'
    WHERE id = ANY(%(ids)s::bigint[]) AND lease_token = %(token)s
    RETURNING dest, lease_holder
), entered AS (
    INSERT INTO {s}.leases (token, dest, holder, expires)
    SELECT %(token)s, dest, lease_holder, now() + %(timeout)s * interval '1 second'
    FROM kept LIMIT 1
    ON CONFLICT (token) DO UPDATE SET expires = excluded.expires
)
SELECT count(*) FROM kept
"""

# A settlement that leaves none of the lease's messages under it ends the lease: its slot
# of the window is free. ``%(rest)s`` are the lease's ids this settlement does not name
# (the statement's own changes are not visible to its sub-queries).
_ENDED = """ended AS (
    DELETE FROM {s}.leases WHERE token = %(token)s AND NOT EXISTS (
        SELECT 1 FROM {s}.messages WHERE id = ANY(%(rest)s::bigint[]) AND lease_token = %(token)s
    )
)"""

_CLEAR = (
    "UPDATE {s}.destinations SET not_before = NULL, failures = 0 "
    "WHERE id = %(dest)s AND (failures <> 0 OR not_before IS NOT NULL)"
)

# A success also grows the destination's window by one, up to its max (AIMD).
_CLEAR_AND_GROW = (
    "UPDATE {s}.destinations SET not_before = NULL, failures = 0, window_limit = CASE "
    "WHEN window_limit < window_max THEN least(window_max, window_limit + 1) "
    "ELSE window_limit END "
    "WHERE id = %(dest)s AND (failures <> 0 OR not_before IS NOT NULL "
    "OR window_limit < window_max)"
)

ACK = f"""
WITH gone AS (
    DELETE FROM {{s}}.messages WHERE id = ANY(%(ids)s::bigint[]) AND lease_token = %(token)s
    RETURNING 1
), clear AS ({_CLEAR_AND_GROW}), {_ENDED}
SELECT count(*) FROM gone
"""

CLEAR_BACKOFF = _CLEAR.replace("%(dest)s", "%s")

CLEAR_ALL_BACKOFF = (
    "UPDATE {s}.destinations SET not_before = NULL, failures = 0 "
    "WHERE failures <> 0 OR not_before IS NOT NULL"
)

CLEAR_MESSAGE_BACKOFF = (
    "UPDATE {s}.messages SET not_before = NULL "
    "WHERE (%s::bigint IS NULL OR dest = %s) AND not_before IS NOT NULL"
)

RELEASE = f"""
WITH back AS (
    UPDATE {{s}}.messages
    SET lease_token = NULL, lease_expires = NULL, attempts = attempts + %(bump)s,
        not_before = CASE WHEN %(delay)s::float8 IS NULL THEN NULL
                          ELSE now() + %(delay)s::float8 * interval '1 second' END
    WHERE id = ANY(%(ids)s::bigint[]) AND lease_token = %(token)s
    RETURNING 1
), {_ENDED}
SELECT count(*) FROM back
"""

LOCK_DESTINATION = "SELECT failures FROM {s}.destinations WHERE id = %s FOR UPDATE"

SET_BACKOFF = """
UPDATE {s}.destinations SET
    not_before = CASE
        WHEN not_before IS NULL OR not_before > now() + %(horizon)s * interval '1 second'
        THEN now() + %(delay)s * interval '1 second'
        ELSE greatest(not_before, now() + %(delay)s * interval '1 second') END,
    failures = failures + 1,
    last_error = coalesce(%(error)s::text, last_error),
    last_error_at = CASE WHEN %(error)s::text IS NULL THEN last_error_at ELSE now() END
WHERE id = %(dest)s
"""

BACKOFF = (
    "SELECT extract(epoch FROM not_before - now())::float8, failures "
    "FROM {s}.destinations WHERE id = %s"
)

DEAD_LETTER = f"""
WITH gone AS (
    DELETE FROM {{s}}.messages WHERE id = ANY(%(ids)s::bigint[]) AND lease_token = %(token)s
    RETURNING id, dest, body, size, enqueued_at, attempts
), {_ENDED}
INSERT INTO {{s}}.dead_letters (dest, body, size, enqueued_at, attempts, status, reason, excerpt)
SELECT dest, body, size, enqueued_at, attempts + 1, %(status)s::integer, %(reason)s, %(excerpt)s
FROM gone ORDER BY id
"""

# Per destination, on the (dest, id) index: ready as soon as the destination is when one
# unleased message of it is ready (the first found ends the look), else at the earliest
# retry time of its waiting messages. Another destination's backlog is never read. A
# destination whose window is full waits for other holders, as if they leased the rest.
NEXT_READY = f"""
SELECT extract(epoch FROM min(greatest(
    CASE WHEN d.not_before > now() + %(horizon)s * interval '1 second' THEN NULL
         ELSE d.not_before END,
    w.at,
    now())) - now())::float8
FROM {{s}}.destinations d
CROSS JOIN LATERAL (
    SELECT CASE WHEN (
        SELECT m.id FROM {{s}}.messages m
        WHERE {_of("d.id", "%(top)s")} AND {_UNLEASED} AND {_READY_MSG}
        ORDER BY m.dest, m.id LIMIT 1
    ) IS NOT NULL THEN now() ELSE (
        SELECT min(m.not_before) FROM {{s}}.messages m
        WHERE {_of("d.id", "%(top)s")} AND {_UNLEASED}
    ) END AS at
) w
WHERE w.at IS NOT NULL AND {ROOM}
    AND (%(dest)s::bigint IS NULL OR d.id = %(dest)s::bigint)
"""

# The first ``limit`` ready messages of each destination that is not backing off and has
# room in its window (from the (dest, id) index), then the oldest ``limit`` of those.
READY_SUMMARY = f"""
SELECT count(*), extract(epoch FROM min(enqueued_at) - now())::float8 FROM (
    SELECT r.id, r.enqueued_at FROM {{s}}.destinations d
    CROSS JOIN LATERAL (
        SELECT m.id, m.enqueued_at FROM {{s}}.messages m
        WHERE {_of("d.id")} AND {_READY_MSG} AND {_UNLEASED}
        ORDER BY m.dest, m.id LIMIT %(limit)s
    ) r
    WHERE {_READY_DEST} AND {ROOM}
    ORDER BY r.id LIMIT %(limit)s
) ready
"""

# Expired leases end: their messages are ready and their slots' rows go. Rows another
# transaction is settling right now are skipped, never waited for (a reclaim waiting on a
# settlement that waits on a backoff that waits on the reclaim's rows would deadlock).
RECLAIM = """
WITH old AS (
    SELECT id, lease_token FROM {s}.messages WHERE lease_expires < now()
    FOR UPDATE SKIP LOCKED
), freed AS (
    UPDATE {s}.messages m SET lease_token = NULL, lease_expires = NULL
    FROM old WHERE m.id = old.id
), slots AS (
    DELETE FROM {s}.leases WHERE token IN (
        SELECT token FROM {s}.leases WHERE expires < now() FOR UPDATE SKIP LOCKED
    )
)
SELECT count(DISTINCT lease_token) FROM old
"""

PENDING = (
    "SELECT count(*) FROM {s}.messages WHERE id <= %(top)s "
    "AND (%(dest)s::bigint IS NULL OR dest = %(dest)s::bigint)"
)

# The destinations the messages hold, one seek each in messages (dest, id) (a loose index
# scan), not a scan of the one that holds the backlog (what "dest <> ALL(...)" over the
# messages would read), nor a trust in the destinations table.
HOLDS_OTHERS = (
    "WITH RECURSIVE held (dest) AS ("
    " (SELECT dest FROM {s}.messages ORDER BY dest LIMIT 1)"
    " UNION ALL"
    " SELECT (SELECT m.dest FROM {s}.messages m WHERE m.dest > h.dest ORDER BY m.dest LIMIT 1)"
    " FROM held h WHERE h.dest IS NOT NULL"
    ") SELECT EXISTS (SELECT 1 FROM held WHERE dest IS NOT NULL"
    " AND dest <> ALL(%(dests)s::bigint[]))"
)

MAX_ID = "SELECT coalesce(max(id), 0) FROM {s}.messages"

LIVE_LEASES = "SELECT count(DISTINCT lease_token) FROM {s}.messages WHERE lease_expires >= now()"

BODIES = "SELECT body FROM {s}.messages ORDER BY id"

# A flush's report of what it did not send (``unleased``): one range of the destination's
# index (messages (dest, id)), past the live leases.
UNLEASED = (
    "SELECT m.id, m.body FROM {s}.messages m WHERE m.dest = %(dest)s "
    "AND m.id > %(after)s AND m.id <= %(top)s AND " + _UNLEASED + " ORDER BY m.id LIMIT %(limit)s"
)

STATS_DESTINATIONS = """
SELECT d.id, d.host, d.write_key,
    CASE WHEN d.not_before > now() THEN extract(epoch FROM d.not_before - now())::float8 END,
    d.failures, d.last_error, extract(epoch FROM now() - d.last_error_at)::float8,
    coalesce(m.n, 0), coalesce(m.leased, 0),
    least(floor(coalesce(d.window_limit, d.window_max)), d.window_max)::int,
    (SELECT count(*) FROM {s}.leases l WHERE l.dest = d.id AND l.expires >= now())
FROM {s}.destinations d LEFT JOIN (
    SELECT dest, count(*) AS n, count(*) FILTER (WHERE lease_expires >= now()) AS leased
    FROM {s}.messages GROUP BY dest
) m ON m.dest = d.id
ORDER BY d.id
"""

STATS_TOTALS = """
SELECT count(*), count(*) FILTER (WHERE lease_expires >= now()), coalesce(sum(size), 0),
    greatest(0, extract(epoch FROM now() - min(enqueued_at)))::float8,
    (SELECT count(*) FROM {s}.dead_letters),
    (SELECT coalesce(sum(value), 0) FROM {s}.counters WHERE name LIKE 'dropped_%%')
FROM {s}.messages
"""

USED = """
SELECT (SELECT coalesce(sum(size), 0) + count(*) * %(overhead)s FROM {s}.messages)
     + (SELECT coalesce(sum(size), 0) + count(*) * %(overhead)s FROM {s}.dead_letters)
"""

COUNT_DROP = "UPDATE {s}.counters SET value = value + %(n)s WHERE name = %(name)s"

COUNTER = "SELECT value FROM {s}.counters WHERE name = %s"

# The oldest unleased messages until ``need`` bytes are freed (the one crossing it included).
DROP_OLDEST = f"""
WITH v AS (
    SELECT m.id, m.size FROM {{s}}.messages m WHERE {_UNLEASED}
    ORDER BY m.id LIMIT 512 FOR UPDATE SKIP LOCKED
), r AS (
    SELECT id, size, sum(size + %(overhead)s) OVER (ORDER BY id) AS running FROM v
), gone AS (
    DELETE FROM {{s}}.messages m USING r
    WHERE m.id = r.id AND r.running - r.size - %(overhead)s < %(need)s
    RETURNING m.size
), counted AS (
    UPDATE {{s}}.counters SET value = value + (SELECT count(*) FROM gone)
    WHERE name = 'dropped_oldest'
)
SELECT coalesce(sum(size + %(overhead)s), 0), count(*) FROM gone
"""

# Past ``limit`` bytes of dead letters, the oldest go until ``keep`` bytes are left.
TRIM_DEAD = """
WITH total AS (
    SELECT coalesce(sum(size + %(overhead)s), 0) AS t FROM {s}.dead_letters
), r AS (
    SELECT id, size, sum(size + %(overhead)s) OVER (ORDER BY id) AS running
    FROM {s}.dead_letters
), gone AS (
    DELETE FROM {s}.dead_letters l USING r, total
    WHERE total.t > %(limit)s AND l.id = r.id
      AND r.running - r.size - %(overhead)s < total.t - %(keep)s
    RETURNING 1
), counted AS (
    UPDATE {s}.counters SET value = value + (SELECT count(*) FROM gone)
    WHERE name = 'dead_letters_purged'
)
SELECT count(*) FROM gone
"""

DEAD_LETTERS = """
SELECT l.id, d.host, d.write_key, l.status, l.reason, l.excerpt, l.attempts,
    extract(epoch FROM l.enqueued_at)::float8, extract(epoch FROM l.dead_at)::float8, l.body
FROM {s}.dead_letters l JOIN {s}.destinations d ON d.id = l.dest
WHERE %(all)s OR l.id = ANY(%(ids)s::bigint[])
ORDER BY l.id
"""

DEAD_LETTER_MARK = """
SELECT coalesce(max(id), 0), extract(epoch FROM clock_timestamp())::float8
FROM {s}.dead_letters
"""

DEAD_LETTERED_SINCE = """
SELECT count(*) FROM {s}.dead_letters
WHERE id > %(mark)s AND enqueued_at <= to_timestamp(%(at)s::float8)
    AND (%(dest)s::bigint IS NULL OR dest = %(dest)s::bigint)
"""

REQUEUE_DEAD = """
WITH gone AS (
    DELETE FROM {s}.dead_letters WHERE %(all)s OR id = ANY(%(ids)s::bigint[])
    RETURNING id, dest, body, size, enqueued_at
), back AS (
    INSERT INTO {s}.messages (dest, body, size, enqueued_at)
    SELECT dest, body, size, enqueued_at FROM gone ORDER BY id
)
SELECT count(*) FROM gone
"""

PURGE_DEAD = """
WITH gone AS (
    DELETE FROM {s}.dead_letters WHERE %(all)s OR id = ANY(%(ids)s::bigint[]) RETURNING 1
)
SELECT count(*) FROM gone
"""

# Parameter: the schema name. Not every role may see other sessions' snapshots; then NULL.
TABLE_HEALTH = """
SELECT s.n_live_tup, s.n_dead_tup, pg_total_relation_size(s.relid),
    extract(epoch FROM now() - greatest(s.last_vacuum, s.last_autovacuum))::float8,
    (SELECT max(age(backend_xmin)) FROM pg_stat_activity WHERE backend_xmin IS NOT NULL),
    (SELECT extract(epoch FROM now() - min(xact_start))::float8 FROM pg_stat_activity
     WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid())
FROM pg_stat_user_tables s WHERE s.schemaname = %s AND s.relname = 'messages'
"""

# max_queue_size: the rows, leased ones included (run under the count lock, see _caps.py).
COUNT_MESSAGES = "SELECT count(*) FROM {s}.messages"

# The ``n`` oldest unleased messages (fewer when the rest is leased), counted as dropped.
DROP_OLDEST_ROWS = f"""
WITH v AS (
    SELECT m.id FROM {{s}}.messages m WHERE {_UNLEASED}
    ORDER BY m.id LIMIT %(n)s FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {{s}}.messages m USING v WHERE m.id = v.id RETURNING m.size
), counted AS (
    UPDATE {{s}}.counters SET value = value + (SELECT count(*) FROM gone)
    WHERE name = 'dropped_oldest'
)
SELECT count(*), coalesce(sum(size + %(overhead)s), 0) FROM gone
"""

# Fast takeover (``_holders.py``): a holder registers in the transaction that takes its
# session lock, so its row is never seen without the lock.
REGISTER_HOLDER = "INSERT INTO {s}.holders DEFAULT VALUES RETURNING id"

# Holders whose session lock is gone: their sessions ended. Trying the lock (shared, until
# this transaction ends) asks the lock manager about each holder alone, in this database.
DEAD_HOLDERS = """
SELECT h.id FROM {s}.holders h
WHERE pg_try_advisory_xact_lock_shared(%(cls)s::int4, mod(h.id, 2147483648)::int4)
"""

# The dead holders' leases end now (their messages are ready again), and their rows go.
TAKE_OVER = """
WITH old AS (
    SELECT id, lease_token FROM {s}.messages
    WHERE lease_holder = ANY(%(dead)s::bigint[]) AND lease_token IS NOT NULL
    FOR UPDATE
), freed AS (
    UPDATE {s}.messages m SET lease_token = NULL, lease_expires = NULL
    FROM old WHERE m.id = old.id
), gone AS (
    DELETE FROM {s}.holders WHERE id = ANY(%(dead)s::bigint[])
), slots AS (
    DELETE FROM {s}.leases WHERE token IN (
        SELECT token FROM {s}.leases WHERE holder = ANY(%(dead)s::bigint[])
        FOR UPDATE SKIP LOCKED
    )
)
SELECT count(DISTINCT lease_token) FROM old
"""
