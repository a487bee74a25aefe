-- A waiting label is one per prediction and model named, no longer one per prediction: a label naming
-- another model than the prediction's (sent by mistake) kept the right one from waiting, and the right one
-- was dropped. A later label for the same pair replaces the one waiting (a correction).
ALTER TABLE pending_labels DROP CONSTRAINT pending_labels_pkey, ADD PRIMARY KEY (prediction_id, model);
