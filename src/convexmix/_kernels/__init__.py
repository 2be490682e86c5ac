"""The kernels (private): the native CPU library and its families, the Triton kernels,
and the output cache.

:mod:`.native` is the ground (it loads the library, binds it, splits ranges and runs them
over threads); one module a family stands on it: :mod:`.cpu` (with :mod:`.gpu` and
:mod:`.aten`, behind :mod:`.combine`: ``convex_combination``), :mod:`.rows` (sparsemax
and 1.5-entmax: ``functional._sparse``, ``functional._project``), :mod:`.capped` (the
bounded maps: ``functional._bounded``), :mod:`.checks` (the softmax's NaN check:
``functional._softmax``), :mod:`.gather` (the ensemble's true-class read:
``ensemble._inputs``), and :mod:`.alloc` (large CPU outputs from the cache of ``pool.c``:
``combine``, ``ensemble._inputs``, ``ensemble._objectives``; its controls:
``convexmix._runtime``). Nothing else in convexmix imports this package.
"""
