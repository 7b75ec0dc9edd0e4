"""The job queue: everything between a producer and the engine.

A job's path: `client` (a producer enqueues a `payload` on the queue `routing` picks) -> `resident`
(the worker loop) -> `claims` (atomic claim, finish, give back) -> `executor` (payload -> engine
call) -> the result in rq's stream. `recovery` returns the jobs of dead workers exactly once, `stats`
is what `seqshare status` reads, `batch_qa` is the producer behind `seqshare qa`, and `hold` the
test gate. `rq_adapter` is every call into rq and every rq key name: nothing else imports rq.
"""
