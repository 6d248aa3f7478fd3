package capture

import (
	"os"
	"path/filepath"
	"testing"
)

// proc builds a fake /proc: files maps a path under it to its content.
func proc(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, content := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestDetectIPv6Proc(t *testing.T) {
	const conf = "sys/net/ipv6/conf/"
	for _, tc := range []struct {
		name            string
		files           map[string]string
		kernel, enabled bool
	}{
		{"no IPv6 in the kernel", map[string]string{"net/dev": ""}, false, false},
		{"all=1 but an interface re-enabled", map[string]string{
			conf + "all/disable_ipv6": "1\n", conf + "default/disable_ipv6": "1\n", conf + "lo/disable_ipv6": "1\n", conf + "eth0/disable_ipv6": "0\n",
		}, true, true},
		{"disabled everywhere", map[string]string{
			conf + "all/disable_ipv6": "1\n", conf + "default/disable_ipv6": "1\n", conf + "lo/disable_ipv6": "1\n", conf + "eth0/disable_ipv6": "1\n", "net/if_inet6": "",
		}, true, false},
		{"new interfaces would get it", map[string]string{
			conf + "all/disable_ipv6": "1\n", conf + "default/disable_ipv6": "0\n", conf + "lo/disable_ipv6": "1\n",
		}, true, true},
		{"an address exists", map[string]string{
			conf + "all/disable_ipv6": "1\n", "net/if_inet6": "fd000018000000000000000000000001 02 40 00 80     eth0\n",
		}, true, true},
		{"only if_inet6", map[string]string{"net/if_inet6": ""}, true, true},
	} {
		p := detectIPv6Proc(proc(t, tc.files))
		if p.Kernel != tc.kernel || (p.Enabled != "") != tc.enabled {
			t.Errorf("%s: got %+v, want kernel %v enabled %v", tc.name, p, tc.kernel, tc.enabled)
		}
	}
}
