-- A classifier's label that names none of its version's classes ("yes" for the classes 0 and 1) is joined and
-- counted as a wrong prediction, and marked, so that /v1/status counts them per model version. Labels joined
-- before are not marked (the rule is the service's, not SQL's).
ALTER TABLE labelled ADD COLUMN IF NOT EXISTS outside_classes boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS labelled_outside_classes ON labelled (model, version) WHERE outside_classes;
