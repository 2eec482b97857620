"""Expert placement: metrics (metrics.py), planners (planners.plan_layer), whole-trace planning
(trace_plan.plan_trace); see docs/placement.md."""
