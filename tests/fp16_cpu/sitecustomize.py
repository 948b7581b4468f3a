"""Put on PYTHONPATH by the fp16 tests only: tell DeepSpeed's CPU accelerator that this CPU trains in fp16.

DeepSpeed's CPU accelerator reports fp16 only where oneDNN has fp16 kernels (AVX-512 FP16 / AMX-FP16), and refuses
an fp16 engine elsewhere; PyTorch itself computes fp16 on any CPU (its reference kernels, slower). Only that probe is
overridden: the engine, its fp16 optimizer, the dynamic loss scaler and every operation run for real.
"""

from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator


def _fp16_supported(self: CPU_Accelerator) -> bool:
    return True


CPU_Accelerator.is_fp16_supported = _fp16_supported
