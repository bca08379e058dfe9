"""The reliability harness: faults, load and bad input, run small by ``tests/test_reliability.py`` and at
full size by ``benchmarks/bench_reliability.py`` (the figures in benchmarks/README.md).

* :mod:`.fuzzing` over :mod:`.corpus`, :mod:`.mutations`, :mod:`.folder_mutations` and
  :mod:`.file_bytes`: hostile adapter files of every format and algorithm, each loaded in a forked
  worker, the outcome judged and the model compared with its pristine copy;
* :mod:`.cycles`: drift over fuse/unfuse cycles, memory over load/unload cycles (:mod:`.memory`);
* :mod:`.killing`: adapter saves, checkpoint writes and training runs SIGKILLed at random moments;
* :mod:`.bad_inputs`: wrong arguments to the command line, the trainer and the web UI;
* :mod:`.ui_load`: concurrent sessions on the web UI;
* :mod:`.subjects`: the tiny pipelines, the adapters made on them, the trainer's and the UI's scripts.

Nothing in the library imports this.
"""
