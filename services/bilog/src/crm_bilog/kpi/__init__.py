"""Realtime KPIs per business line from the BI event stream (``python -m crm_bilog kpi``).

A consumer group member (:mod:`crm_bilog.kpi.consumer`) reads the TaskTransition,
AgentPresenceChanged, FactCallRecord and FailedEvent topics, decodes them through the
schema registry like the sink (:mod:`crm_bilog.kpi.decode`), folds them per partition
into a pure event-time state (:mod:`crm_bilog.kpi.domain`: replays deduped, out-of-order
delivery tolerated) and exports Prometheus metrics (:mod:`crm_bilog.kpi.metrics`) on its
metrics port, next to gRPC health (``crm_common`` server kit: NOT_SERVING until every
owned partition replayed its history).

Restarts, the choice made:

* **Gauges are rebuilt, never persisted.** Tasks waiting / open, agents by presence, the
  oldest wait, offers and recycles of the last window: on every partition assignment
  the partition is replayed from its beginning, so after a restart or a rebalance they
  are what the retained history says. They are exact as long as the topics' retention
  covers the life of an open task (an agent's last presence change); size the BI topics'
  retention for it (days, not hours) or the oldest open tasks are missed.
* **Counters and the wait histogram count since the process started**, and only events
  the previous incarnation had not committed: records before the group's committed
  offset (at assignment) rebuild state only; from it on they are counted, and their
  offsets are committed after each batch. Prometheus' ``rate()``/``increase()`` stitch
  the incarnations together (a restart is an ordinary counter reset), so nothing is
  counted twice, except the records of the one batch being processed when a process is
  killed (applied, perhaps scraped, not yet committed). A first start (no committed
  offset) counts the whole retained history once.
* Several replicas split the partitions (a task's events share a partition: key
  ``business_line:task_id``); every gauge and counter is summed over replicas in PromQL.
"""
