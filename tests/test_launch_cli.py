"""``memdlm-launch slurm`` without a cluster: the script it writes, and what it refuses (the Slurm runs
themselves are in test_slurm)."""

import subprocess

import pytest

from launch.launch_cli import main
from launch.slurm import ranks_from_slurm

TRAIN = ["--model.num_layers", "4", "--train.global_batch_size", "16", "--train.micro_batch_size", "2"]


@pytest.mark.fast
def test_the_script_has_one_torchrun_per_node_preemption_and_requeue(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["slurm", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "1:00:00",
                 "--grace", "90", "--", *TRAIN, "--train.out_dir", str(out)]) == 0
    script = (out / "slurm" / "job.sbatch").read_text()
    assert capsys.readouterr().out == script
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=B:USR1@90", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00"):
        assert line in script.splitlines(), line
    assert "--nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d" in script
    assert "--signals-to-handle=SIGTERM,SIGUSR1,SIGINT" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert f"--train.out_dir {out}" in script and 'if [ -f "$OUT/DONE" ]' in script
    assert subprocess.run(["bash", "-n", str(out / "slurm" / "job.sbatch")]).returncode == 0


@pytest.mark.fast
def test_elastic_runs_and_refusals(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["slurm", "--nodes", "2", "--min-nodes", "1", "--", *TRAIN, "--train.out_dir", str(out)]) == 0
    assert "--nnodes=1:2" in (out / "slurm" / "job.sbatch").read_text()
    capsys.readouterr()
    # 3 nodes x 1 rank cannot split a global batch of 16 sequences: said before anything is submitted.
    assert main(["slurm", "--nodes", "3", "--", *TRAIN, "--train.out_dir", str(tmp_path / "x")]) == 2
    assert "on 3 nodes" in capsys.readouterr().err
    # An elastic run must be valid at every size it may shrink to.
    elastic = ["slurm", "--nodes", "4", "--min-nodes", "3"]
    assert main([*elastic, "--", *TRAIN, "--train.out_dir", str(tmp_path / "y")]) == 2
    assert "with 3 of the elastic run's nodes" in capsys.readouterr().err
    assert main(["slurm", "--nodes", "2", "--", "--model.no_such_field", "1"]) == 2
    assert "no_such_field" in capsys.readouterr().err


@pytest.mark.fast
def test_srun_python_takes_its_rank_from_slurm():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x4)",
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1234", "MASTER_ADDR": "head"}
    assert ranks_from_slurm(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                     "MASTER_PORT": str(29500 + 1234)}
    assert ranks_from_slurm({**env, "RANK": "0"}) == {}  # torchrun (or the user) already said
    assert ranks_from_slurm({k: v for k, v in env.items() if k != "SLURM_STEP_ID"}) == {}  # the batch shell


@pytest.mark.fast
def test_a_layout_that_cannot_fit_the_stated_gpu_memory_is_refused_with_its_plan(tmp_path, capsys):
    """The 8B recipe on 4 nodes x 8 GPUs fits 80 GiB (about 35 GiB per rank); without tensor parallelism and
    ZeRO (16 bytes per parameter, 8B parameters on every rank) it does not, and the refusal comes with the plan
    and what to change."""
    llada = ["--config", "recipes/llada-8b-continued.toml"]
    assert main(["slurm", "--nodes", "4", "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--", *llada,
                 "--train.out_dir", str(tmp_path / "fits")]) == 0
    assert "tensor 2 x pipeline 1 x data 16" in capsys.readouterr().err
    assert main(["slurm", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--", *llada,
                 "--parallel.zero_stage", "0", "--parallel.tensor_parallel_size", "1", "--train.global_batch_size", "8",
                 "--train.micro_batch_size", "1", "--train.out_dir",
                 str(tmp_path / "too-big")]) == 2
    err = capsys.readouterr().err
    assert "GiB on its fullest rank but --gpu-memory-gb is 80" in err and "GiB per rank" in err
    assert not (tmp_path / "too-big").exists()
