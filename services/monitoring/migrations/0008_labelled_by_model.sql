-- A joined label is one per prediction and model, as a waiting one is (0003): prediction ids are the
-- clients' to choose, and two models may answer with the same id. Keyed by the id alone, the second model's
-- label took the first one's row (its label replaced, model and version kept), and the second was never
-- stored. The rows stored before are one per id, so they fit the new key as they are.
ALTER TABLE labelled DROP CONSTRAINT labelled_pkey, ADD PRIMARY KEY (prediction_id, model);
