"""The seqshare engine: model, KV and prefix cache, decode loop, sampling, document QA."""
