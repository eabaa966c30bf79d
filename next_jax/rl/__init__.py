"""RL with verifiable rewards: what a run trains (trained), GRPO-family losses and estimators (grpo), the
RL step and evaluation (trainer), verifiers (rewards), tasks and benchmarks (tasks, chat_tasks, rg_tasks).
Imports models and core."""
