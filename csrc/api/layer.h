/* api/layer.h - see pycri.h for the conventions. */
