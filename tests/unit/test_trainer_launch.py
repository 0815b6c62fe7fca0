"""How the runner starts the trainer for a job of one GPU or several, and what a worker counts as its GPUs."""

from pathlib import Path

import pytest
from accelerate.commands.launch import launch_command_parser

from workers.gpu import count_visible, devices_for_job, visible_devices
from workers.runner import MULTICAST_OFF, trainer_command, trainer_environment

SPEC, OUTDIR = Path("/runs/job-7/spec.json"), Path("/runs/job-7/out")


def test_one_gpu_runs_the_engine_itself():
    command = trainer_command(SPEC, OUTDIR, gpus=1)
    assert command[1:] == ["-m", "workers.training", str(SPEC), str(OUTDIR)]


def test_two_gpus_run_the_engine_under_accelerates_launcher():
    command = trainer_command(SPEC, OUTDIR, gpus=2, port=29611)
    assert command[1:] == [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29611",
        "-m", "workers.training", str(SPEC), str(OUTDIR),
    ]
    # The flags are the launcher's own: its parser reads them as meant.
    args = launch_command_parser().parse_args(command[3:])
    assert args.multi_gpu and args.num_processes == 2 and args.num_machines == 1 and args.main_process_port == 29611
    assert args.mixed_precision == "no" and args.dynamo_backend.lower() == "no"
    assert args.module and args.training_script == "workers.training"
    assert args.training_script_args == [str(SPEC), str(OUTDIR)]


@pytest.mark.parametrize(("visible", "gpus", "expected"), [
    (None, 2, "0,1"),
    (None, 8, "0,1,2,3,4,5,6,7"),
    ("4,5,6,7", 2, "4,5"),
    ("GPU-aaaa,GPU-bbbb,GPU-cccc", 3, "GPU-aaaa,GPU-bbbb,GPU-cccc"),
])
def test_a_multi_gpu_child_sees_the_workers_first_gpus(visible, gpus, expected):
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert devices_for_job(gpus, environ) == expected
    env = trainer_environment(gpus, environ)
    assert env["CUDA_VISIBLE_DEVICES"] == expected and env.items() >= MULTICAST_OFF.items()


def test_a_one_gpu_child_keeps_the_workers_devices_and_every_child_has_multicast_off():
    env = trainer_environment(1, {"CUDA_VISIBLE_DEVICES": "3", "NCCL_NVLS_ENABLE": "1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in trainer_environment(1, {})


@pytest.mark.parametrize(("visible", "device_count", "expected"), [
    (None, 8, 8),  # unset: every GPU of the host
    ("0", 8, 1),
    ("2,3", 8, 2),
    ("", 8, 0),  # set empty: none
    ("-1", 4, 0),
    ("1,7,2", 4, 1),  # CUDA stops at the first index past the last GPU
    ("0,,1", 4, 1),
    ("GPU-aaaa,GPU-bbbb", 4, 2),
    ("0,1,2,3,4,5", 2, 2),
])
def test_a_workers_gpus_are_nvmls_count_within_cuda_visible_devices(visible, device_count, expected):
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert count_visible(device_count, environ) == expected
    assert visible_devices(environ) is None if visible is None else isinstance(visible_devices(environ), list)
