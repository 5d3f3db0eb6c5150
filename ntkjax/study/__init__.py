"""The application built on ntkjax: the ``ntkjax`` command line (:mod:`ntkjax.study.cli`), the NTK
study it reproduces (:mod:`ntkjax.study.demo`, with its report :mod:`ntkjax.study.report`), the
``ntkjax sweep`` command (:mod:`ntkjax.study.sweep_command`) and real datasets
(:mod:`ntkjax.study.datasets`). The library (:mod:`ntkjax`) never imports this package."""

__all__: list[str] = []
