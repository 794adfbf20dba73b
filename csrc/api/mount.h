/* api/mount.h - host-side mount helpers; see pycri.h for the conventions.
 *
 * The container's own mounts (rootfs, /proc, /dev, binds, masks, pivot_root)
 * are made inside its mount namespace by pycri_spawn (csrc/mount.c); these are
 * for callers that want a rootfs mounted on the host, e.g. to inspect it.
 */

/* Mount an overlay of lower (colon list, top first) + upper + work at target. */
int pycri_mount_overlay(const char *target, const char *lower, const char *upper,
                        const char *work, struct pycri_error *err);

/* The same, read-only (no upper), with every layer id-mapped to the user namespace
 * at userns_path (a pod's): what a user-namespaced pod mounts as an image volume. */
int pycri_mount_overlay_idmapped(const char *target, const char *lower, const char *userns_path,
                                 struct pycri_error *err);

/* An overlay of lower (colon list, top first) + upper + work as a detached mount
 * (*fd_out, CLOEXEC; closing it unmounts it), for pycri_spawn_spec.rootfs_mount_fd,
 * with the given dirs and empty files made in it (in-root, as the container's
 * setup makes its mount points) where missing. */
int pycri_overlay_premount(const char *lower, const char *upper, const char *work,
                           const char *const *dirs, const char *const *files, int *fd_out,
                           struct pycri_error *err);

/* A new detached mount of the mount at fd (open_tree OPEN_TREE_CLONE; fd may be
 * a detached mount itself): the same file system, attached and dropped on its
 * own (*fd_out, CLOEXEC). A premounted overlay kept by its maker outlives the
 * containers that each attach a clone of it. */
int pycri_mount_clone(int fd, int *fd_out, struct pycri_error *err);

/* A /dev tmpfs (mode 755, 64 MiB) with the standard nodes, links and mount
 * point dirs a container's /dev has, as a detached mount (*fd_out, CLOEXEC),
 * for pycri_spawn_spec.dev_mount_fd. */
int pycri_dev_premount(int *fd_out, struct pycri_error *err);

/* Lazily unmount target (MNT_DETACH, not following a final symlink). */
int pycri_mount_unmount(const char *target, struct pycri_error *err);
