"""The warning filters silence the named third-party messages from their own modules only."""
import warnings

from mswift.runtime.quiet import quiet_known_warnings

APEX = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
SP = ("When using sequence parallelism it is recommended to set the environment variable "
      "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup")
GRAD = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its ..."


def shown(cuda: bool, cases) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings(cuda=cuda)
        for message, category, module in cases:
            warnings.warn_explicit(message, category, f"{module}.py", 1, module=module)
    return [f"{w.message} @ {w.filename}" for w in caught]


def test_known_messages_are_silenced_from_their_modules_only():
    cases = [(APEX, UserWarning, "megatron.core.optimizer"),
             (GRAD, UserWarning, "mswift.runtime.cpu_layer"),
             ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...",
              FutureWarning, "torch.distributed.c10d_logger"),
             (SP, UserWarning, "megatron.core.tensor_parallel.layers")]
    assert shown(cuda=False, cases=cases) == []
    # where CUDA is present the CUDA_DEVICE_MAX_CONNECTIONS advice applies and still shows
    assert shown(cuda=True, cases=cases) == [f"{SP} @ megatron.core.tensor_parallel.layers.py"]
    # the same text from anywhere else, and any other warning, still shows
    others = [(APEX, UserWarning, "mswift.train.loop"),
              (GRAD, UserWarning, "mswift.train.step"),
              ("something else", UserWarning, "megatron.core.optimizer")]
    assert len(shown(cuda=False, cases=others)) == 3
