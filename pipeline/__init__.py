"""The recipes on top of the stages: the main job (``pipeline.main``), the token-layout comparison
(``pipeline.compare``) and the main job's report (``pipeline.report``). They import ``tokenizer``,
``ar_model``, ``sampling`` and ``eval``; no stage and nothing in ``groupgen`` (the contracts every stage
imports) imports this package."""
