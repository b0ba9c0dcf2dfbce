"""C++ sources of the native CPU kernels. The repository's ``csrc/`` folder is installed as the
package ``fastalign.csrc`` so that ``fastalign._native`` finds the sources to build, in a
checkout and in an installed wheel alike."""
