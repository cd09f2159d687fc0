"""Stage one of MedAlign: the dataset layer, teachers, and the teacher-target cache.

`distill` reads caches only through `open_cache`; nothing here imports `distill`.
Teachers (open_clip) are imported lazily by `precompute.teachers` users only.
"""

from .cache import Cache, CacheError, TeacherGroup, open_cache

__all__ = ["Cache", "CacheError", "TeacherGroup", "open_cache"]
