"""Results out: the row schema, the commit protocol, the run manifest and resume decision, the merge,
mergeable statistics and quality gates. Never imports the job or the report."""
