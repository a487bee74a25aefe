-- Joined labels leave `labelled` once no query needs them (handlers.prune_labelled, labelled_keep_days): a label
-- is counted here as it is deleted, so that /v1/status counts every label joined, as it did when every row
-- stayed. Per model the labels (once per id, as label_counts counts them) and the late ones; per model version
-- the rows whose label named none of its classes. Kept, like `labelled`, the table grew by a row per label.
CREATE TABLE IF NOT EXISTS labels_pruned (
    model     text   PRIMARY KEY,
    labelled  bigint NOT NULL,
    late      bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS labels_outside_classes_pruned (
    model    text    NOT NULL,
    version  integer NOT NULL,
    labels   bigint  NOT NULL,
    PRIMARY KEY (model, version)
);
