-- A joined label is one per prediction, model and version: in a shadow rollout serving logs the candidate's
-- scoring of a served row under the served prediction's id and model (with its own version, variant
-- shadow), and the label is the truth for both. Keyed by (prediction_id, model), one label joined one of the
-- two, and the stable version got no labels for the rows its candidate shadowed. The rows stored before are
-- one per id and model, so they fit the new key as they are.
ALTER TABLE labelled DROP CONSTRAINT labelled_pkey, ADD PRIMARY KEY (prediction_id, model, version);
