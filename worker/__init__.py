"""The seqshare engine: bundles, model, KV and prefix cache, scheduler, sampling, job execution."""
