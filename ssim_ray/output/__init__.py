"""Results out: the row schema, the commit protocol, the run manifest and resume decision, the merge,
mergeable statistics and quality gates. Never imports the job or the report.

- layout: the name of every file under an output folder, and the filesystem access to it;
- provenance: `created` stamps and library versions;
- schema: RESULT_SCHEMA and the one row builder, `result_row`; a shard's table;
- commit: part file, then commit marker; finding committed shards;
- stamps: what a marker records about where its rows come from (plan, metric digest, run), run ids;
- inputs: the input versions a row records, their digest in the marker, the check a resume makes;
- claim, claim_store: one run at a time per output (an exclusive lease with a heartbeat);
- resume: the run manifest and the resume decision, and the check of every committed marker;
- merge: committed parts into ssim.parquet and summary.json;
- publish: atomic publication of whole files (temporary name and rename, or the object written last);
- stats (mergeable statistics), table_stats (from a table), summary_stats (percentiles, the summary's part);
- gates: pass or fail, and the exit code, from summary.json.
"""
