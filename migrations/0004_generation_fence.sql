-- The fenced write of the single-statement allocation path (service/usecases.py, _Lane._fast):
-- a statement that bumps pool generations only where they still have the value its engine
-- was built at, and aborts (SQLSTATE 40001, serialization_failure) if any had moved, so
-- that nothing it inserted survives. The caller then takes the locked path.
CREATE FUNCTION kipam_fence(bumped bigint, expected integer) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF bumped <> expected THEN
        RAISE EXCEPTION 'kipam: a pool''s generation moved (% of % pools current)',
            bumped, expected USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN true;
END $$;
