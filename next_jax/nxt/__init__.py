"""NExt and the other jumps along a weight trajectory: the trajectory type (trajectory), rank-1 triplets
(rank1), drift measures (drift), the predictor (predictor), the methods' registry and NExtConfig
(extrapolate), trajectories written by verl/TRL/PEFT (runs), post-hoc analyses (posthoc), plots (plots).
Imports rl, models and core."""
