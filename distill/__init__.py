"""Stage two of MedAlign: distill cached teacher targets into a LLaVA-style student.

    from distill import load_medalign
    model = load_medalign("runs/unimed-l20")   # a run, or a folder `medalign-distill export` wrote
    print(model.answer(["scan.png"], "Is there a pleural effusion?"))
"""

from .inference import MedAlignModel, load_medalign

__all__ = ["MedAlignModel", "load_medalign"]
