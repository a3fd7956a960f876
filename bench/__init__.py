"""Benchmarks: the `promptmux bench` harness, the generation and serving benchmarks, and their shared parts.

The harness (`promptmux bench`, harness.run) in layers, each importing only those below it:

- settings.py     what to measure (BenchSettings), its checks and reproducing command line;
- workload.py     what is sent: token-id batches, traffic mixes, the request stream (Workload);
- measure.py      timing primitives: RSS sampling, percentiles, warm-up, interleaved rounds, summaries;
- machine.py      the machine and device a result was measured on, quiet library logging;
- baseline.py, isolated.py, systems.py   the systems measured (promptmux, PEFT eager), in worker processes;
- throughput.py, scaling.py, accuracy.py the three parts of a run (accuracy_lm.py: a language model's demo,
                                         its answers generated);
- plots.py, report.py                    JSON, Markdown, PNG, the results page, the CLI summary;
- harness.py      one run: the parts the settings ask for, then the report.

prompt_kinds.py holds everything here that depends on a task's prompt kind. models.py builds and caches the
benchmark models, adapters and deployments (generation.py, deployments.py). Other entry points:
`python -m promptmux.bench.generation`, `.serve_load`, `.deployments`, `.report`, `.many_tasks` (a million
classification tasks; `promptmux bench --many-tasks`) and `.many_tasks_generation` (100,000 SmolLM2 tasks). One-off studies are not
here: they live in the checkout's top-level studies/ folder. Recorded results: results/.
"""
