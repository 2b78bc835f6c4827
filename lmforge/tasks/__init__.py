"""Objectives: a model, its batches, its loss, its metrics, and how a run of it starts and is read.

base.py      `Task`: the loop's interface (lmforge/train/interface.py) plus the plug-in declarations
registry.py  task.name -> objective class; `register` adds one
loading.py   load any run (through its objective) or a transformers directory back
mlm.py clm.py electra.py distill.py classify.py   the built-in objectives, one file each

May import: train (its interface and schedule), eval, runs, models, data, ops, config. Never the
jobs above (pretrain, finetune, cli, api), and the loop imports nothing from here.
"""
