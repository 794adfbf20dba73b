/* api/cgroup.h - see pycri.h for the conventions. */
