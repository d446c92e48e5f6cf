-- Consumption between two readings of a cumulative register (the documented rule):
--   cur >= prev                              -> cur - prev
--   cur <  prev, register_max set and the
--     wrapped delta cur + register_max - prev
--     is at most half the register          -> that wrapped delta (a rollover: the register
--                                              counts 0 .. register_max and wraps to 0)
--   otherwise                               -> cur (a reset: the register restarted from 0)
-- Never negative for non-negative readings. Meter replacements are explicit events
-- (public.meter_replacements), applied by refresh_rollups() around this rule.
CREATE FUNCTION buildsmart.register_delta(prev double precision, cur double precision, register_max double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
RETURN CASE
    WHEN prev IS NULL OR cur IS NULL THEN NULL
    WHEN cur >= prev THEN cur - prev
    WHEN register_max IS NOT NULL AND cur + register_max - prev <= register_max / 2 THEN cur + register_max - prev
    ELSE cur
END;
