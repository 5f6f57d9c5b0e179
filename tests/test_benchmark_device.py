"""The benchmarks' device line names the CPU (benchmarks/device.py)."""
import os
import platform

from benchmarks import device

CORES = len(os.sched_getaffinity(0))

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse4_2 avx avx2 fma avx512f avx512bw
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse4_2 avx avx2 fma avx512f avx512bw
"""
AMD = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse4_2 avx fma avx2
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes crc32
CPU implementer\t: 0x41
"""


def _write(tmp_path, text):
  path = tmp_path / 'cpuinfo'
  path.write_text(text)
  return str(path)


def test_the_model_the_cores_and_the_widest_vector_instructions(tmp_path):
  assert (device.cpu_name(_write(tmp_path, INTEL))
          == f'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, {CORES} cores, AVX-512')
  assert device.cpu_name(_write(tmp_path, AMD)) == f'AMD EPYC, {CORES} cores, AVX2'


def test_without_a_model_name_or_a_cpuinfo_file_the_platform_names_it(tmp_path):
  fallback = platform.processor() or platform.machine() or 'unknown CPU'
  assert device.cpu_name(_write(tmp_path, ARM)) == f'{fallback}, {CORES} cores, NEON'
  assert device.cpu_name(str(tmp_path / 'missing')) == f'{fallback}, {CORES} cores'


def test_the_device_line_on_the_cpu_backend_names_the_cpu():
  # conftest gives the tests four virtual CPU devices.
  line = device.device_line()
  assert line == f'cpu cpu x4 ({device.cpu_name()})', line
  assert device.device_line(local=True) == line
