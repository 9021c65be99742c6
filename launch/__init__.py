"""The command-line tools and how processes start: option parsing, torchrun and Slurm launchers, signals,
the one-line usage errors. Only parses, checks and starts; the work is done below."""
