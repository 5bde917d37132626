"""Pairs in: plan a dataset into shards on the driver, stream and decode one shard's pairs in a worker.
Never imports the output, the report or the job."""
