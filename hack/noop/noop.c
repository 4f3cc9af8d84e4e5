/*
 * prewarm-noop: the do-nothing program every pre-pull initContainer runs.
 *
 * A pre-pull container exists only so the kubelet pulls its image; what it runs must
 * then exit 0 at once. Images built FROM scratch or distroless have no shell and no
 * /bin/true, so the first initContainer copies this static executable out of Prewarm's
 * own image into an emptyDir and every pull container runs it from there. It has no
 * dynamic loader or libc dependency, so it runs on any image of the node's architecture.
 *
 * Build (the Dockerfile's `noop` stage does this per platform):
 *   gcc -static -Os -s -o prewarm-noop hack/noop/noop.c
 * Tested by tests/unit/test_noop.py.
 */
int main(void)
{
    /* Arguments are ignored on purpose: the reconciler may pass anything. */
    return 0;
}
