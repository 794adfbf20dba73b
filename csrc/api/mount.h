/* api/mount.h - see pycri.h for the conventions. */
