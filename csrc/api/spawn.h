/* api/spawn.h - see pycri.h for the conventions. */
