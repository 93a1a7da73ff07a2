-- test/extension_objects.sql: the shape of the installed extension usage_billing, one line per
-- fact, sorted; test/t/060_upgrade.pl compares it between a fresh install and an update.
--
-- The objects are the members of the extension (pg_depend deptype 'e'), named by kind and
-- identity (pg_identify_object), with what belongs to them:
--   relations   kind, persistence, options, row-level security, owner; their columns (position,
--               name, type with typmod, not null, default, generated, identity, collation);
--               constraints (pg_get_constraintdef), indexes (pg_get_indexdef), triggers
--               (pg_get_triggerdef, enabled), policies, rules, view definitions, sequence
--               parameters
--   functions   pg_get_functiondef, and its flags one by one (kind, volatility, strictness,
--               security definer, parallel, leakproof, proconfig, owner)
--   types       kind and definition
--   privileges  of every relation, column, function, type and of the schema, grant by grant
--               (aclexplode: grantor, grantee, privilege, grant option), in a fixed order
--   comments    of every object above and of its columns, constraints, triggers, policies and
--               indexes; of the schema and of the roles
--   extension   version, schema, extconfig with extcondition (pg_dump's data tables)
--   roles       the roles named usage_billing_*: attributes, memberships, comments
-- Everything is printed by name, never by OID, so two databases (or clusters) compare as text;
-- view and function definitions are printed line by line (numbered), so that a difference
-- shows as the lines that differ.  Run with psql -X -A -t -q.

WITH ext AS (
    SELECT e.oid, e.extname, e.extversion, e.extnamespace, e.extrelocatable,
           e.extconfig, e.extcondition
      FROM pg_extension e
     WHERE e.extname = 'usage_billing'
), members AS (
    SELECT d.classid, d.objid, i.type, i.identity
      FROM pg_depend d
      JOIN ext ON d.refobjid = ext.oid
     CROSS JOIN LATERAL pg_identify_object(d.classid, d.objid, 0) i
     WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
), rels AS (
    SELECT m.objid AS oid, m.type || ' ' || m.identity AS name
      FROM members m
     WHERE m.classid = 'pg_class'::regclass
), procs AS (
    SELECT m.objid AS oid, m.type || ' ' || m.identity AS name
      FROM members m
     WHERE m.classid = 'pg_proc'::regclass
), roles AS (
    SELECT r.oid, r.rolname
      FROM pg_roles r
     WHERE r.rolname LIKE 'usage\_billing\_%'
), facts (line) AS (
    -- every member, by kind and identity
    SELECT 'member ' || m.type || ' ' || m.identity
      FROM members m
    UNION ALL
    -- relations
    SELECT r.name || ': relkind=' || c.relkind::text
           || ' persistence=' || c.relpersistence::text
           || ' am=' || coalesce(am.amname, '-')
           || ' options=' || coalesce(array_to_string(ARRAY(SELECT o FROM unnest(c.reloptions) o ORDER BY 1), ','), '-')
           || ' rowsecurity=' || c.relrowsecurity::text
           || ' forcerowsecurity=' || c.relforcerowsecurity::text
           || ' replident=' || c.relreplident::text
           || ' owner=' || pg_get_userbyid(c.relowner)
      FROM rels r
      JOIN pg_class c ON c.oid = r.oid
      LEFT JOIN pg_am am ON am.oid = c.relam
    UNION ALL
    -- columns: position among the live columns, name, type, not null, default, generated,
    -- identity, collation
    SELECT r.name || ': column ' || lpad((row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum))::text, 3, '0')
           || ' ' || quote_ident(a.attname)
           || ' ' || format_type(a.atttypid, a.atttypmod)
           || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
           || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), '')
           || CASE WHEN a.attgenerated <> '' THEN ' generated=' || a.attgenerated::text ELSE '' END
           || CASE WHEN a.attidentity <> '' THEN ' identity=' || a.attidentity::text ELSE '' END
           || CASE WHEN a.attcollation <> 0 THEN ' collate ' || a.attcollation::regcollation::text ELSE '' END
      FROM rels r
      JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
    UNION ALL
    SELECT r.name || ': constraint ' || quote_ident(k.conname) || ' ' || pg_get_constraintdef(k.oid)
      FROM rels r
      JOIN pg_constraint k ON k.conrelid = r.oid
    UNION ALL
    SELECT r.name || ': index ' || pg_get_indexdef(i.indexrelid)
      FROM rels r
      JOIN pg_index i ON i.indrelid = r.oid
    UNION ALL
    SELECT r.name || ': trigger ' || pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
      FROM rels r
      JOIN pg_trigger t ON t.tgrelid = r.oid AND NOT t.tgisinternal
    UNION ALL
    SELECT r.name || ': policy ' || quote_ident(p.polname)
           || ' cmd=' || p.polcmd::text
           || ' permissive=' || p.polpermissive::text
           || ' to=' || array_to_string(ARRAY(
                  SELECT CASE WHEN x = 0 THEN 'public' ELSE pg_get_userbyid(x) END
                    FROM unnest(p.polroles) x ORDER BY 1), ',')
           || ' using=' || coalesce(pg_get_expr(p.polqual, p.polrelid), '-')
           || ' check=' || coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '-')
      FROM rels r
      JOIN pg_policy p ON p.polrelid = r.oid
    UNION ALL
    SELECT r.name || ': rule ' || pg_get_ruledef(w.oid)
      FROM rels r
      JOIN pg_rewrite w ON w.ev_class = r.oid AND w.rulename <> '_RETURN'
    UNION ALL
    SELECT r.name || ': definition ' || lpad(d.n::text, 4, '0') || ' ' || d.line
      FROM rels r
      JOIN pg_class c ON c.oid = r.oid AND c.relkind IN ('v', 'm')
     CROSS JOIN LATERAL regexp_split_to_table(pg_get_viewdef(c.oid), E'\n') WITH ORDINALITY AS d(line, n)
    UNION ALL
    SELECT r.name || ': sequence ' || format_type(s.seqtypid, NULL)
           || ' start=' || s.seqstart || ' increment=' || s.seqincrement
           || ' min=' || s.seqmin || ' max=' || s.seqmax || ' cache=' || s.seqcache
           || ' cycle=' || s.seqcycle::text
           || coalesce(' owned by ' || (SELECT pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid)
                                          FROM pg_depend d
                                         WHERE d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid
                                           AND d.refclassid = 'pg_class'::regclass
                                           AND d.deptype IN ('a', 'i')), '')
      FROM rels r
      JOIN pg_sequence s ON s.seqrelid = r.oid
    UNION ALL
    -- functions: the whole definition, line by line (a failure shows the lines that differ),
    -- then each flag on its own
    SELECT p.name || ': definition ' || lpad(d.n::text, 4, '0') || ' ' || d.line
      FROM procs p
      JOIN pg_proc f ON f.oid = p.oid AND f.prokind <> 'a'
     CROSS JOIN LATERAL regexp_split_to_table(pg_get_functiondef(f.oid), E'\n') WITH ORDINALITY AS d(line, n)
    UNION ALL
    SELECT p.name || ': kind=' || f.prokind::text
           || ' volatility=' || f.provolatile::text
           || ' strict=' || f.proisstrict::text
           || ' security_definer=' || f.prosecdef::text
           || ' parallel=' || f.proparallel::text
           || ' leakproof=' || f.proleakproof::text
           || ' cost=' || f.procost || ' rows=' || f.prorows
           || ' config=' || coalesce(array_to_string(f.proconfig, ';'), '-')
           || ' owner=' || pg_get_userbyid(f.proowner)
      FROM procs p
      JOIN pg_proc f ON f.oid = p.oid
    UNION ALL
    -- types created by the extension (not the row types of its tables)
    SELECT m.type || ' ' || m.identity || ': typtype=' || t.typtype::text
           || ' ' || format_type(t.oid, NULL)
           || coalesce(' base ' || format_type(nullif(t.typbasetype, 0), t.typtypmod), '')
      FROM members m
      JOIN pg_type t ON t.oid = m.objid
     WHERE m.classid = 'pg_type'::regclass
    UNION ALL
    -- privileges, one grant a line
    SELECT r.name || ': grant ' || g.privilege_type
           || ' to ' || CASE WHEN g.grantee = 0 THEN 'public' ELSE pg_get_userbyid(g.grantee) END
           || ' by ' || pg_get_userbyid(g.grantor)
           || CASE WHEN g.is_grantable THEN ' with grant option' ELSE '' END
      FROM rels r
      JOIN pg_class c ON c.oid = r.oid
     CROSS JOIN LATERAL aclexplode(coalesce(c.relacl, acldefault(
               CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char", c.relowner))) g
    UNION ALL
    SELECT r.name || ': column ' || quote_ident(a.attname) || ' grant ' || g.privilege_type
           || ' to ' || CASE WHEN g.grantee = 0 THEN 'public' ELSE pg_get_userbyid(g.grantee) END
           || ' by ' || pg_get_userbyid(g.grantor)
           || CASE WHEN g.is_grantable THEN ' with grant option' ELSE '' END
      FROM rels r
      JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
     CROSS JOIN LATERAL aclexplode(a.attacl) g
    UNION ALL
    SELECT p.name || ': grant ' || g.privilege_type
           || ' to ' || CASE WHEN g.grantee = 0 THEN 'public' ELSE pg_get_userbyid(g.grantee) END
           || ' by ' || pg_get_userbyid(g.grantor)
           || CASE WHEN g.is_grantable THEN ' with grant option' ELSE '' END
      FROM procs p
      JOIN pg_proc f ON f.oid = p.oid
     CROSS JOIN LATERAL aclexplode(coalesce(f.proacl, acldefault('f', f.proowner))) g
    UNION ALL
    SELECT m.type || ' ' || m.identity || ': grant ' || g.privilege_type
           || ' to ' || CASE WHEN g.grantee = 0 THEN 'public' ELSE pg_get_userbyid(g.grantee) END
           || ' by ' || pg_get_userbyid(g.grantor)
           || CASE WHEN g.is_grantable THEN ' with grant option' ELSE '' END
      FROM members m
      JOIN pg_type t ON t.oid = m.objid
     CROSS JOIN LATERAL aclexplode(coalesce(t.typacl, acldefault('T', t.typowner))) g
     WHERE m.classid = 'pg_type'::regclass
    UNION ALL
    -- the extension's schema (not a member: the extension depends on it)
    SELECT 'schema ' || quote_ident(n.nspname) || ': owner=' || pg_get_userbyid(n.nspowner)
      FROM ext
      JOIN pg_namespace n ON n.oid = ext.extnamespace
    UNION ALL
    SELECT 'schema ' || quote_ident(n.nspname) || ': grant ' || g.privilege_type
           || ' to ' || CASE WHEN g.grantee = 0 THEN 'public' ELSE pg_get_userbyid(g.grantee) END
           || ' by ' || pg_get_userbyid(g.grantor)
           || CASE WHEN g.is_grantable THEN ' with grant option' ELSE '' END
      FROM ext
      JOIN pg_namespace n ON n.oid = ext.extnamespace
     CROSS JOIN LATERAL aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) g
    UNION ALL
    -- comments: of the members and their columns, of the constraints, indexes, triggers and
    -- policies of member relations, and of the schema
    SELECT 'comment on ' || pg_describe_object(d.classoid, d.objoid, d.objsubid) || ': ' || d.description
      FROM pg_description d
     WHERE (d.classoid, d.objoid) IN (SELECT m.classid, m.objid FROM members m)
        OR (d.classoid = 'pg_constraint'::regclass
            AND d.objoid IN (SELECT k.oid FROM pg_constraint k WHERE k.conrelid IN (SELECT oid FROM rels)))
        OR (d.classoid = 'pg_class'::regclass
            AND d.objoid IN (SELECT i.indexrelid FROM pg_index i WHERE i.indrelid IN (SELECT oid FROM rels)))
        OR (d.classoid = 'pg_trigger'::regclass
            AND d.objoid IN (SELECT t.oid FROM pg_trigger t WHERE t.tgrelid IN (SELECT oid FROM rels)))
        OR (d.classoid = 'pg_policy'::regclass
            AND d.objoid IN (SELECT p.oid FROM pg_policy p WHERE p.polrelid IN (SELECT oid FROM rels)))
        OR (d.classoid = 'pg_namespace'::regclass
            AND d.objoid = (SELECT extnamespace FROM ext))
    UNION ALL
    -- the extension itself: version, schema, the tables pg_dump keeps with their conditions
    SELECT 'extension ' || ext.extname || ': version=' || ext.extversion
           || ' schema=' || ext.extnamespace::regnamespace::text
           || ' relocatable=' || ext.extrelocatable::text
      FROM ext
    UNION ALL
    SELECT 'extension ' || ext.extname || ': config ' || c.cfg::regclass::text
           || ' condition=' || quote_literal(coalesce(ext.extcondition[c.n], '<none>'))
      FROM ext
     CROSS JOIN LATERAL unnest(ext.extconfig) WITH ORDINALITY AS c(cfg, n)
    UNION ALL
    -- the roles the extension creates: attributes, memberships, comments
    SELECT 'role ' || r.rolname || ': super=' || a.rolsuper::text
           || ' inherit=' || a.rolinherit::text
           || ' createrole=' || a.rolcreaterole::text
           || ' createdb=' || a.rolcreatedb::text
           || ' login=' || a.rolcanlogin::text
           || ' replication=' || a.rolreplication::text
           || ' bypassrls=' || a.rolbypassrls::text
           || ' connlimit=' || a.rolconnlimit
           || ' config=' || coalesce(array_to_string(a.rolconfig, ';'), '-')
      FROM roles r
      JOIN pg_roles a ON a.oid = r.oid
    UNION ALL
    SELECT 'role ' || pg_get_userbyid(am.member) || ': member of ' || pg_get_userbyid(am.roleid)
           || CASE WHEN am.admin_option THEN ' with admin option' ELSE '' END
      FROM pg_auth_members am
     WHERE am.member IN (SELECT oid FROM roles) OR am.roleid IN (SELECT oid FROM roles)
    UNION ALL
    SELECT 'comment on role ' || r.rolname || ': ' || d.description
      FROM roles r
      JOIN pg_shdescription d ON d.classoid = 'pg_authid'::regclass AND d.objoid = r.oid
)
-- one fact a line: a line break inside a fact (a comment's text) is written \n
SELECT replace(line, E'\n', '\n') FROM facts ORDER BY line COLLATE "C";
