/* api/monitor.h - see pycri.h for the conventions. */
