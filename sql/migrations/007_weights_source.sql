-- featstore schema version 7: where an embed run's weights were found, beside their identity.
-- weights_id names what determines the vectors (the tensors' hash, pooling, input pipeline); this records
-- the folder or file, the files, how they were found (--weights, weights-dir, git clone, hub cache) and
-- the revision when known (a hub snapshot's commit, a git clone's HEAD). NULL for runs before version 7
-- and for backbones without such a record (random-init, torchxrayvision, torchvision, ONNX).
ALTER TABLE embed_runs ADD COLUMN weights_source JSON;
