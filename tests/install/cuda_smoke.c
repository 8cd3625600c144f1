/* Links a C program against the installed libkvq_cuda.a (kvq::kvq_cuda) and asks for the devices: status 0 with a
 * GPU, KVQ_ERR_NO_DEVICE and 0 devices without one (CI); both mean the library links and runs. */
#include <kvq_cuda.h>
#include <stdio.h>

int main(void) {
    int n = -1;
    kvq_status s = kvq_cuda_device_count(&n);
    printf("kvq_cuda_device_count: %s, %d device(s)%s%s\n", kvq_strerror(s), n, s ? ": " : "",
           s ? kvq_cuda_last_error() : "");
    return (s == KVQ_OK && n > 0) || (s == KVQ_ERR_NO_DEVICE && n == 0) ? 0 : 1;
}
