"""Results out: the row schema, the commit protocol, the run manifest and resume decision, the merge,
mergeable statistics and quality gates. Never imports the job or the report.

- layout: the name of every file under an output folder, and the filesystem access to it;
- provenance: `created` stamps and library versions;
- schema: RESULT_SCHEMA and the one row builder, `result_row`; a shard's table;
- commit: part file, then commit marker; finding committed shards;
- resume: the run manifest and the resume decision;
- merge: committed parts into ssim.parquet and summary.json;
- stats (mergeable statistics), table_stats (from a table), summary_stats (percentiles, the summary's part);
- gates: pass or fail, and the exit code, from summary.json.
"""
